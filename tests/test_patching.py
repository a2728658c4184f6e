"""patch_model / unpatch / merge / user_context / set_backend on tiny random Hugging Face
models (Llama, Qwen2, GPT-2 with its Conv1D, BERT), built from configs on the CPU."""

import pytest
import torch

import proper
import proper_kernels
from _helpers.models import (
    BATCH_IDS,
    GPT2,
    LLAMA,
    NUM_USERS,
    adapter_names,
    assert_state_equal,
    full_config,
    loss_of,
    make_batch,
    output_of,
    population_config,
    randomize_adapters,
    state_copy,
)


def patched(spec, config=None, seed=0):
    model = spec.build(seed)
    return proper.patch_model(model, config or full_config(spec.targets))


def module_map(model):
    return dict(model.named_modules())


# -- 1. a fresh patch computes exactly the base model ----------------------------------------


def test_fresh_patch_gives_exactly_the_base_output(spec):
    model = spec.build().eval()
    ids = make_batch()
    with torch.no_grad():
        expect = output_of(model, ids)
        proper.patch_model(model, full_config(spec.targets))
        layers = proper.proper_layers(model)
        with proper.user_context(model, BATCH_IDS):
            got = output_of(model, ids)
    # every target was replaced, and every replaced layer ran
    assert layers and all(isinstance(m, proper.ProperLinear) for m in layers.values())
    assert {n for n, m in model.named_modules() if isinstance(m, proper.ProperLinear)} == set(layers)
    assert all(n.endswith(spec.targets) for n in layers)
    assert all(l.last_backend == "torch" for l in layers.values())
    assert (got - expect).abs().max().item() == 0


# -- 2. unpatch restores the very same modules, flags and weights ----------------------------


def test_unpatch_restores_modules_flags_and_state(spec):
    model = spec.build()
    # a mix of flags, so that "restore" can't be faked by setting everything to True
    frozen = next(n for n, _ in model.named_parameters())
    model.get_parameter(frozen).requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = module_map(model)
    before = state_copy(model)

    proper.patch_model(model, full_config(spec.targets))
    replaced = set(proper.proper_layers(model))
    assert replaced and all(model.get_submodule(n) is not modules[n] for n in replaced)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in adapter_names(model))
    with torch.no_grad(), proper.user_context(model, BATCH_IDS):
        output_of(model, make_batch())

    assert proper.unpatch(model) is model
    assert proper.is_patched(model) is False
    assert not any(isinstance(m, proper.ProperLinear) for m in model.modules())
    after = module_map(model)
    assert set(after) == set(modules)
    assert all(after[n] is modules[n] for n in modules), "unpatch must put back the same objects"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert flags[frozen] is False
    assert_state_equal(model, before)
    with pytest.raises(ValueError, match="not patched"):
        proper.unpatch(model)


# -- 3. training touches the adapters only ---------------------------------------------------


def grads_by_name(model):
    return {n: p.grad for n, p in model.named_parameters()}


def test_training_updates_adapters_and_never_the_base(spec):
    model = patched(spec).train()
    adapters = adapter_names(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapters
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in adapters}
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in adapters}
    # every parameter goes to the optimizer: a frozen base must not move even so
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = make_batch()
    for step in range(2):  # step 1: B = 0, so A and the routers get zero gradient; step 2: all do
        opt.zero_grad()
        with proper.user_context(model, BATCH_IDS):
            loss = loss_of(model, ids)
        loss.backward()
        opt.step()
    grads = grads_by_name(model)
    # step 2 gave every adapter tensor of every layer a non-zero gradient
    no_grad = sorted(n for n in adapters if grads[n] is None or not grads[n].abs().max() > 0)
    assert not no_grad, f"adapter tensors without gradient at step 2: {no_grad}"
    assert all(grads[n] is None for n in base_before), "a frozen base parameter got a gradient"
    params = dict(model.named_parameters())
    moved = sorted(n for n, t in base_before.items() if not torch.equal(params[n], t))
    assert not moved, f"base parameters changed: {moved}"
    unchanged = sorted(n for n, t in adapters_before.items() if torch.equal(params[n], t))
    assert not unchanged, f"adapter tensors not updated: {unchanged}"


def test_sgd_updates_only_the_rows_of_users_in_the_batch(spec):
    model = patched(spec).train()
    layers = proper.proper_layers(model)
    before = {(name, p): t.detach().clone() for name, l in layers.items() for p, t in l.adapter_parameters().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = make_batch()
    for _ in range(2):
        opt.zero_grad()
        with proper.user_context(model, BATCH_IDS):
            loss_of(model, ids).backward()
        opt.step()
    in_batch = sorted(u for u in BATCH_IDS if u >= 0)
    absent = sorted(set(range(NUM_USERS)) - set(in_batch))
    assert absent, "the batch must leave some users out for this test to mean anything"
    for name, l in layers.items():
        for p in ("user_A", "user_B"):
            new, old = getattr(l, p), before[(name, p)]
            assert torch.equal(new[absent], old[absent]), f"{name}.{p}: rows of users not in the batch moved"
            for u in in_batch:
                assert not torch.equal(new[u], old[u]), f"{name}.{p}: row of user {u} (in the batch) did not move"
        # the user-aware router: rows 0..N-1 per user, row N the default for id -1 (in the batch)
        new, old = l.router_user, before[(name, "router_user")]
        assert torch.equal(new[absent], old[absent]), f"{name}.router_user: rows of absent users moved"
        for row in in_batch + [NUM_USERS]:
            assert not torch.equal(new[row], old[row]), f"{name}.router_user row {row} did not move"
        for p in ("lora_A", "lora_B", "router_x", "router_h"):
            assert not torch.equal(getattr(l, p), before[(name, p)]), f"{name}.{p} did not move"


def test_training_then_unpatch_gives_back_the_original_weights():
    model = LLAMA.build()
    before = state_copy(model)
    proper.patch_model(model, full_config(LLAMA.targets)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        with proper.user_context(model, BATCH_IDS):
            loss_of(model, make_batch()).backward()
        opt.step()
    proper.unpatch(model)
    assert_state_equal(model, before)


# -- 4. bad target patterns are refused and change nothing -----------------------------------


def assert_untouched(model, modules, flags):
    assert proper.is_patched(model) is False
    assert not any(isinstance(m, proper.ProperLinear) for m in model.modules())
    after = module_map(model)
    assert set(after) == set(modules) and all(after[n] is modules[n] for n in modules)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("case", ["unmatched_name", "unmatched_regex", "not_linear"])
def test_bad_target_pattern_is_refused_and_changes_nothing(spec, case):
    model = spec.build()
    modules, flags = module_map(model), {n: p.requires_grad for n, p in model.named_parameters()}
    if case == "unmatched_name":
        targets, exc, named = [*spec.targets, "nonexistent_proj"], ValueError, "nonexistent_proj"
    elif case == "unmatched_regex":
        targets, exc, named = r".*\.nonexistent_\w+", ValueError, "nonexistent_"
    else:
        targets, exc, named = [*spec.targets, spec.not_linear], TypeError, spec.not_linear
    with pytest.raises(exc) as err:
        proper.patch_model(model, full_config(spec.targets), target_modules=targets)
    assert named in str(err.value)
    if case == "unmatched_name":
        assert not any(repr(t) in str(err.value) for t in spec.targets), "only the unmatched pattern is named"
    assert_untouched(model, modules, flags)
    # the same model patches fine afterwards
    proper.patch_model(model, full_config(spec.targets))
    assert proper.is_patched(model)


def test_regex_target_selects_whole_names():
    model = LLAMA.build()
    proper.patch_model(model, full_config(LLAMA.targets), target_modules=r"model\.layers\.1\.mlp\.(up|down)_proj")
    assert set(proper.proper_layers(model)) == {"model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}


def test_patching_twice_is_refused(spec):
    model = patched(spec)
    layers = proper.proper_layers(model)
    modules = module_map(model)
    with pytest.raises(ValueError, match="already patched"):
        proper.patch_model(model, full_config(spec.targets))
    assert proper.proper_layers(model) == layers
    after = module_map(model)
    assert set(after) == set(modules) and all(after[n] is modules[n] for n in modules)
    # a ProperLinear placed by hand (without patch_model's record) is refused as well
    proper.unpatch(model)
    name = next(iter(layers))
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layers[name])
    with pytest.raises(ValueError, match="ProperLinear"):
        proper.patch_model(model, full_config(spec.targets))
    assert proper.is_patched(model) is False


# -- 5. merge (the population stage folds into the base weights) -----------------------------


@pytest.mark.parametrize("spec", [LLAMA, GPT2], ids=lambda s: s.name)
def test_merge_population_lora_gives_a_plain_model_with_the_same_output(spec):
    model = spec.build()
    ids = make_batch()
    with torch.no_grad():
        base_out = output_of(model.eval(), ids)
    modules = module_map(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    proper.patch_model(model, population_config(spec.targets)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # no user ids needed: the population config has no user parts
        opt.zero_grad()
        loss_of(model, ids).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        expect = output_of(model, ids)
    assert not torch.allclose(expect, base_out, atol=1e-4), "training should have changed the output"

    assert proper.merge(model) is model
    assert proper.is_patched(model) is False
    assert not any(isinstance(m, proper.ProperLinear) for m in model.modules())
    after = module_map(model)
    assert all(after[n] is modules[n] for n in modules)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        got = output_of(model, ids)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "over",
    [dict(num_experts=4, top_k=2), dict(num_users=NUM_USERS, user_rank=3), dict(router=("user",), num_users=2)],
    ids=["experts", "user_bank", "user_router"],
)
def test_merge_refuses_what_cannot_merge_exactly(over):
    model = proper.patch_model(LLAMA.build(), population_config(LLAMA.targets, **over))
    randomize_adapters(model)
    before = state_copy(model)
    layers = proper.proper_layers(model)
    with pytest.raises(ValueError, match="merg"):
        proper.merge(model)
    assert proper.is_patched(model) and proper.proper_layers(model) == layers
    assert all(model.get_submodule(n) is l for n, l in layers.items())
    assert_state_equal(model, before)


# -- 6. user_context ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def user_model():
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets)).eval()
    randomize_adapters(model)
    return model


def run(model, user_ids=None, ids=None):
    ids = make_batch() if ids is None else ids
    with torch.no_grad():
        if user_ids is None:
            return output_of(model, ids)
        with proper.user_context(model, user_ids):
            return output_of(model, ids)


def test_user_ids_of_the_wrong_length_fail_at_the_call(user_model):
    with proper.user_context(user_model, [0, 1, 2]):  # 3 ids for a batch of 4: fine until the call
        with pytest.raises(ValueError, match="user_ids"):
            output_of(user_model, make_batch(batch=4))


@pytest.mark.parametrize("bad", [NUM_USERS, -2, 100])
def test_user_ids_out_of_range_fail_at_context_entry(user_model, bad):
    ctx = proper.user_context(user_model, [0, bad, 1, -1])
    with pytest.raises(ValueError, match=f"contains {bad}\\b"):
        ctx.__enter__()
    with pytest.raises(RuntimeError, match="user_context"):  # no ids were installed
        run(user_model)


@pytest.mark.parametrize(
    "bad,exc",
    [
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError),
        ([0.0, 1.0, 2.0, 3.0], TypeError),
        (torch.tensor([True, False, True, False]), TypeError),
        (torch.zeros(4, 1, dtype=torch.long), ValueError),
        (torch.zeros(2, 2, dtype=torch.long), ValueError),
        (torch.tensor(1), ValueError),
    ],
    ids=["float_tensor", "float_list", "bool", "2d_column", "2d_square", "scalar"],
)
def test_user_ids_of_the_wrong_type_or_rank_are_refused(user_model, bad, exc):
    with pytest.raises(exc, match="user_ids"):
        with proper.user_context(user_model, bad):
            pass


def test_a_model_that_needs_users_refuses_to_run_without_a_context(user_model):
    with pytest.raises(RuntimeError, match="user_context"):
        run(user_model)


def test_a_model_without_user_parts_runs_without_a_context():
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets, num_users=0, router=("token",))).eval()
    randomize_adapters(model)
    assert output_of(model, make_batch()).isfinite().all()


def test_user_contexts_nest_and_restore(user_model):
    ids = make_batch()
    outer, inner = [0, 5, -1, 2], [3, 3, 1, -1]
    want_outer, want_inner = run(user_model, outer, ids), run(user_model, inner, ids)
    assert not torch.equal(want_outer, want_inner), "the users must change the output"
    # each sequence depends on its own user only
    mixed = run(user_model, [0, 3, -1, 1], ids)
    assert torch.equal(mixed[[0, 2]], want_outer[[0, 2]]) and not torch.equal(mixed[1], want_outer[1])

    with torch.no_grad(), proper.user_context(user_model, outer):
        assert torch.equal(output_of(user_model, ids), want_outer)
        with proper.user_context(user_model, inner):
            assert torch.equal(output_of(user_model, ids), want_inner)
        assert torch.equal(output_of(user_model, ids), want_outer)
        with pytest.raises(KeyError):  # an exception inside restores the outer ids too
            with proper.user_context(user_model, inner):
                raise KeyError("boom")
        assert torch.equal(output_of(user_model, ids), want_outer)
    with pytest.raises(RuntimeError, match="user_context"):
        run(user_model)


def test_each_sequence_uses_its_own_user_and_id_minus_one_uses_no_bank_row():
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets)).eval()
    randomize_adapters(model)
    ids = make_batch()
    users = [0, 5, -1, 2]
    before = run(model, users, ids)
    layers = proper.proper_layers(model).values()
    with torch.no_grad():  # change user 5's bank rows: only sequence 1 may move
        for l in layers:
            l.user_A[5].add_(0.5)
            l.user_B[5].add_(0.5)
    after = run(model, users, ids)
    assert torch.equal(after[[0, 2, 3]], before[[0, 2, 3]]) and not torch.equal(after[1], before[1])
    with torch.no_grad():  # change every bank row: the user without a row (-1) must not move
        for l in layers:
            l.user_A.add_(0.5)
            l.user_B.add_(0.5)
    after = run(model, users, ids)
    assert torch.equal(after[2], before[2]) and not torch.equal(after[0], before[0])
    with torch.no_grad():  # the default router row (last) serves id -1 and only id -1
        for l in layers:
            l.router_user[NUM_USERS].normal_(0, 3.0)
    again = run(model, users, ids)
    assert torch.equal(again[[0, 1, 3]], after[[0, 1, 3]]) and not torch.equal(again[2], after[2])


@pytest.mark.parametrize("spec", [LLAMA, GPT2], ids=lambda s: s.name)
def test_batched_generation_for_many_users_matches_one_user_at_a_time(spec):
    model = patched(spec).eval()
    randomize_adapters(model)
    prompts, users = make_batch(seq=5), [0, 5, -1, 2]
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # no early eos
    with torch.no_grad(), proper.user_context(model, users):
        together = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), **kw)
    for i, u in enumerate(users):
        one = prompts[i : i + 1]
        with torch.no_grad(), proper.user_context(model, [u]):
            alone = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kw)
        assert torch.equal(alone[0], together[i]), f"sequence {i} (user {u})"


def test_user_context_needs_proper_layers():
    with pytest.raises(ValueError, match="holds no ProperLinear layer: call proper.patch_model"):
        with proper.user_context(LLAMA.build(), [0]):
            pass


# -- 7. set_backend -------------------------------------------------------------------------


def test_set_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton on the CPU needs the interpreter
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets)).eval()
    layers = proper.proper_layers(model).values()
    assert {l.backend for l in layers} == {"auto"}
    cpu = torch.device("cpu")
    for name in ("triton", "cuda"):
        assert name not in proper_kernels.available_backends(cpu, torch.float32)
        with pytest.raises(RuntimeError, match=name):
            proper.set_backend(model, name)
        assert {l.backend for l in layers} == {"auto"} and proper.get_config(model).backend == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        proper.set_backend(model, "fastest")
    assert {l.backend for l in layers} == {"auto"}

    assert proper.set_backend(model, "torch") is model
    assert {l.backend for l in layers} == {"torch"} and proper.get_config(model).backend == "torch"
    for l in layers:
        l.last_backend = None
    run(model, BATCH_IDS)
    assert {l.last_backend for l in layers} == {"torch"}
