"""A process's shard of the user bank (one process, no process group): it holds only its own
users' rows, computes what the whole bank computes for them, and saves, loads and merges
into the whole adapters exactly."""

import pytest
import torch
from _helpers.models import LLAMA, NUM_USERS, VOCAB, full_config

import proper
from proper.train.distributed import load_shard, merge_shards, save_shard, shard_bank
from proper.io import adapter_state_dict, _read
from proper.layer import owned_rows


def whole_model(**over):
    torch.manual_seed(0)
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets, **over))
    with torch.no_grad():  # every table non-zero, so that a wrong row shows in the outputs
        for p in adapter_state_dict(model).values():
            p.normal_(0.0, 0.2)
    return model


def shard_of(model, rank, world):
    copy = whole_model()
    copy.load_state_dict(model.state_dict())
    return shard_bank(copy, rank, world)


def test_patch_model_allocates_only_the_owned_rows():
    cfg = full_config(LLAMA.targets, num_users=1_000_003)
    model = proper.patch_model(LLAMA.build(), cfg, shard=(3, 8))
    for layer in proper.proper_layers(model).values():
        assert layer.user_A.shape[0] == layer.user_B.shape[0] == len(range(3, 1_000_003, 8)) == 125_000
        assert layer.router_user.shape[0] == 1_000_004  # the router stays whole (E values a user)
    assert proper.patching.bank_shard(model) == (3, 8)


@pytest.mark.parametrize("shard, error", [((2, 2), ValueError), ((-1, 2), ValueError), ((0,), TypeError),
                                          ((0.0, 2), TypeError), ("ab", TypeError)])
def test_bad_shards_are_refused(shard, error):
    with pytest.raises(error, match="shard"):
        proper.patch_model(LLAMA.build(), full_config(LLAMA.targets), shard=shard)


def test_a_shard_needs_a_user_bank():
    with pytest.raises(ValueError, match="no user bank"):
        proper.patch_model(LLAMA.build(), full_config(LLAMA.targets, user_rank=0, router=("token", "user")),
                           shard=(0, 2))


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("sparse", [False, True])
def test_a_shard_computes_what_the_whole_bank_computes_for_its_users(world, sparse):
    whole = whole_model(sparse_user_grad=sparse)
    ids = torch.randint(0, VOCAB, (NUM_USERS + 1, 5), generator=torch.Generator().manual_seed(1))
    users = torch.tensor(list(range(NUM_USERS)) + [-1])
    with proper.user_context(whole, users):
        ref = whole(input_ids=ids).logits
    ref.square().sum().backward()
    for rank in range(world):
        part = shard_of(whole, rank, world)
        for layer in proper.proper_layers(part).values():
            layer.sparse_user_grad = sparse
        mine = torch.tensor([i for i, u in enumerate(users.tolist()) if u < 0 or u % world == rank])
        with proper.user_context(part, users[mine]):
            out = part(input_ids=ids[mine]).logits
        torch.testing.assert_close(out, ref[mine], rtol=1e-5, atol=1e-6)
        # gradients of this rank's sequences alone: recompute them on the whole model
        whole.zero_grad(set_to_none=True)
        with proper.user_context(whole, users[mine]):
            whole(input_ids=ids[mine]).logits.square().sum().backward()
        out.square().sum().backward()
        want, got = adapter_state_dict(whole), adapter_state_dict(part)
        rows = owned_rows(NUM_USERS, rank, world)
        for k, p in got.items():
            g, w = p.grad, want[k].grad
            g = g.to_dense() if g.is_sparse else g
            w = w.to_dense() if w.is_sparse else w
            if k.endswith(("user_A", "user_B")):
                w = w[rows]
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank} {k}: {m}")


def test_a_user_of_another_shard_is_an_error():
    part = shard_bank(whole_model(), 1, 2)
    with pytest.raises(ValueError, match=r"user_ids \[2\] are not in this model's shard"):
        with proper.user_context(part, [1, 2, -1]):
            pass


def test_shards_save_load_and_merge_into_the_whole_adapters(tmp_path):
    whole = whole_model()
    proper.save_adapters(whole, tmp_path / "whole")
    parts = [shard_of(whole, r, 3) for r in range(3)]
    with pytest.raises(ValueError, match="save_shard"):
        proper.save_adapters(parts[0], tmp_path / "nope")
    with pytest.raises(ValueError, match="holds shard"):
        save_shard(parts[0], tmp_path / "nope", 1, 3)
    paths = [save_shard(p, tmp_path / f"rank-{r}") for r, p in enumerate(parts)]
    merged = _read(merge_shards(paths, tmp_path / "merged"))[1]
    original = _read(tmp_path / "whole")[1]
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[k], original[k]) for k in original)

    # a fresh shard loads its own file, or its rows of the whole adapters; never another rank's
    fresh = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets), shard=(2, 3))
    load_shard(fresh, paths[2])
    assert all(torch.equal(a, b) for a, b in zip(adapter_state_dict(fresh).values(),
                                                  adapter_state_dict(parts[2]).values()))
    with pytest.raises(ValueError, match="holds shard"):
        load_shard(fresh, paths[1])
    other = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets), shard=(1, 3))
    proper.load_adapters(other, tmp_path / "whole")
    assert all(torch.equal(a, b) for a, b in zip(adapter_state_dict(other).values(),
                                                  adapter_state_dict(parts[1]).values()))
