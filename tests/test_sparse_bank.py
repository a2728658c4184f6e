"""A user bank of a million users: sparse bank gradients (ProperConfig.sparse_user_grad) and
LazyAdamW, which keeps optimizer state only for the users it has seen."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from _helpers.models import LLAMA, NUM_USERS, VOCAB, full_config

import proper
import proper_kernels
from proper_kernels import reference
from proper.optim import LazyAdamW
from proper.train.trainer import TrainConfig, train

DT = torch.float64


def test_dense_gradients_follow_torch_adamw_exactly():
    torch.manual_seed(0)
    w0 = torch.randn(5, 3, dtype=DT)
    a, b = w0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    oa = LazyAdamW([a], lr=0.1, weight_decay=0.05)
    ob = torch.optim.AdamW([b], lr=0.1, weight_decay=0.05)
    for step in range(6):
        g = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_sparse_rows_get_adamw_updates_and_state_only_for_rows_seen():
    table = torch.randn(10, 3, 2, dtype=DT)
    lazy, dense = table.clone().requires_grad_(True), table.clone().requires_grad_(True)
    ol, od = LazyAdamW([lazy], lr=0.05), torch.optim.AdamW([dense], lr=0.05, weight_decay=0.0)
    rows = torch.tensor([4, 1, 4])  # a repeated row: its gradients add up
    for step in range(5):
        target = torch.randn(3, 6, dtype=DT, generator=torch.Generator().manual_seed(step))
        for t, opt, sparse in ((lazy, ol, True), (dense, od, False)):
            got = reference._take_rows(t, rows, sparse)
            loss = (got.reshape(3, 6) - target).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            assert t.grad.is_sparse == sparse
            opt.step()
    torch.testing.assert_close(lazy, dense, rtol=1e-10, atol=1e-12)  # rows 1, 4: the same updates
    untouched = [r for r in range(10) if r not in (1, 4)]
    assert torch.equal(lazy[untouched], table[untouched])
    assert ol.rows_with_state(lazy) == 2
    assert ol.state[lazy]["exp_avg"].shape[0] < 10 or ol.state[lazy]["exp_avg"].shape[0] == 16  # grown lazily
    assert ol.state[lazy]["row_step"][ol.state[lazy]["slot"][torch.tensor([1, 4])]].tolist() == [5, 5]


@pytest.mark.parametrize("path", ["dense", "sparse", "sparse-coming-back"])
def test_gather_rows_gradient_equals_dense_indexing(path):
    """reference.gather_rows, the one gather with a sparse table gradient (the reference's
    bank rows and the layer's local router rows): each gradient path equals plain indexing."""
    table = torch.randn(9, 4, dtype=DT)
    rows = torch.tensor([7, 2, 7, 0])  # a repeated row: its gradients add up
    dy = torch.randn(4, 4, dtype=DT)
    want_t = table.clone().requires_grad_(True)
    want_t[rows].backward(dy)
    t = table.clone().requires_grad_(True)
    got = reference.gather_rows(t, rows, sparse=path == "sparse")
    # "sparse-coming-back": the gradient of the gathered rows is itself sparse (a kernel's)
    got.backward(dy.to_sparse(1) if path == "sparse-coming-back" else dy)
    assert t.grad.is_sparse == (path != "dense")
    torch.testing.assert_close(t.grad.to_dense(), want_t.grad, rtol=0, atol=1e-12)


def test_a_row_is_bias_corrected_by_its_own_step_count():
    p = torch.zeros(4, 1, dtype=DT, requires_grad=True)
    opt = LazyAdamW([p], lr=0.1)
    for rows in ([0], [1], [1], [0]):
        opt.zero_grad()
        torch.nn.functional.embedding(torch.tensor(rows), p, sparse=True).sum().backward()
        opt.step()
    # Adam with a constant gradient moves by lr per step once bias-corrected: both rows
    # stepped twice (each at its own t = 1, 2), whatever the steps in between.
    torch.testing.assert_close(p[:2, 0], torch.tensor([-0.2, -0.2], dtype=DT), rtol=1e-6, atol=1e-9)
    assert p[2:].abs().sum() == 0


def test_sparse_bank_gradients_equal_the_dense_ones():
    x = torch.randn(6, 4, 5, dtype=DT)
    W = torch.randn(3, 5, dtype=DT)
    ids = torch.tensor([2, -1, 0, 2, 5, 1])
    grads = []
    for sparse in (False, True):
        g = torch.Generator().manual_seed(0)
        t = {n: torch.randn(*s, dtype=DT, generator=g).requires_grad_(True) for n, s in
             (("lora_A", (2, 2, 5)), ("lora_B", (2, 3, 2)), ("router_x", (2, 5)), ("router_user", (8, 2)),
              ("router_h", (2, 3)), ("user_A", (7, 3, 5)), ("user_B", (7, 3, 3)))}
        y = proper_kernels.proper_linear(x, x @ W.t(), scaling=1.5, top_k=1, user_ids=ids, user_scaling=0.7,
                                         sparse_user_grad=sparse, backend="auto", **t)
        y.pow(2).sum().backward()
        grads.append(t)
    for n in grads[0]:
        sparse_grad = grads[1][n].grad
        assert sparse_grad.is_sparse == (n in ("user_A", "user_B", "router_user")), n
        torch.testing.assert_close(sparse_grad.to_dense(), grads[0][n].grad, rtol=1e-12, atol=1e-12, msg=n)


@pytest.mark.skipif("triton" not in proper_kernels.available_backends("cpu", torch.float32),
                    reason="Triton on the CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("per_token", [False, True], ids=["per-sequence", "per-token"])
def test_triton_sparse_bank_gradients_equal_the_dense_ones(per_token):
    """The Triton backend's compact bank gradients (rows of the users present, as sparse
    tensors) against the torch backend's dense ones."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, 5, generator=g)
    W = torch.randn(3, 5, generator=g)
    ids = torch.tensor([2, -1, 0, 2, 5, 1])
    if per_token:
        ids = torch.randint(-1, 7, (6, 4), generator=torch.Generator().manual_seed(3))
    grads = []
    for backend, sparse in (("torch", False), ("triton", True)):
        g = torch.Generator().manual_seed(0)
        t = {n: torch.randn(*s, generator=g).requires_grad_(True) for n, s in
             (("lora_A", (2, 2, 5)), ("lora_B", (2, 3, 2)), ("router_x", (2, 5)), ("router_user", (8, 2)),
              ("router_h", (2, 3)), ("user_A", (7, 3, 5)), ("user_B", (7, 3, 3)))}
        y = proper_kernels.proper_linear(x, x @ W.t(), scaling=1.5, top_k=2, user_ids=ids, user_scaling=0.7,
                                         sparse_user_grad=sparse, backend=backend, **t)
        assert proper_kernels.last_backend() == backend
        y.pow(2).sum().backward()
        grads.append(t)
    for n in grads[0]:
        got = grads[1][n].grad
        assert got.is_sparse == (n in ("user_A", "user_B", "router_user")), n
        ref = grads[0][n].grad
        torch.testing.assert_close(got.to_dense(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=n)
    # Only the rows of users in the batch carry values.
    present = sorted(set(ids[ids >= 0].tolist()))
    rows = grads[1]["user_A"].grad.coalesce().indices()[0].tolist()
    assert set(rows) <= set(present) | {0}


def batch_at(step):
    g = torch.Generator().manual_seed(2000 + step)
    ids = torch.randint(0, VOCAB, (4, 9), generator=g)
    return {"input_ids": ids, "labels": ids, "user_rows": torch.randint(-1, NUM_USERS, (4,), generator=g)}


def test_training_with_a_sparse_bank_resumes_and_matches_dense_rows_seen_every_step(tmp_path):
    cfg = TrainConfig(steps=6, lr=1e-2, save_every=3, progress=False, load_balance=0.0, distinctness=0.0)
    fresh = lambda: proper.patch_model(LLAMA.build(), full_config(LLAMA.targets, sparse_user_grad=True))  # noqa: E731
    torch.manual_seed(0)
    straight = fresh()
    losses = train(straight, batch_at, cfg, tmp_path / "a")
    assert all(torch.isfinite(torch.tensor(losses)))

    class Killed(Exception):
        pass

    def kill(step, loss):
        if step == 4:
            raise Killed

    torch.manual_seed(0)
    with pytest.raises(Killed):
        train(fresh(), batch_at, cfg, tmp_path / "b", on_step=kill)
    resumed = fresh()
    assert train(resumed, batch_at, cfg, tmp_path / "b") == losses
    want, got = proper.io.adapter_state_dict(straight), proper.io.adapter_state_dict(resumed)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # users never in a batch keep their initial rows
    seen = {int(u) for s in range(6) for u in batch_at(s)["user_rows"] if u >= 0}
    start = fresh()
    for name, layer in proper.proper_layers(straight).items():
        for u in set(range(NUM_USERS)) - seen:
            assert torch.equal(layer.user_A[u], proper.proper_layers(start)[name].user_A[u])


MILLION = textwrap.dedent("""
    import json, resource, sys, torch, proper
    from proper.optim import LazyAdamW
    N, d, r, E, B = 1_000_000, 8, 8, 2, 64
    def rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    before = rss()
    cfg = proper.ProperConfig(num_experts=E, top_k=1, rank=2, user_rank=r, num_users=N,
                              router=("user", "lora"), sparse_user_grad=True, backend="torch")
    layer = proper.ProperLinear(torch.nn.Linear(d, d), cfg)
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = LazyAdamW(params, lr=1e-2)
    ids = torch.randperm(N)[:B]
    x = torch.randn(B, 16, d)
    after_init = rss()
    before_B = layer.user_B[ids].clone()
    loss = layer(x, user_ids=ids).pow(2).mean()
    loss.backward()
    opt.step()
    moved = bool((layer.user_B[ids] != before_B).all(-1).any(-1).all())  # every batch user's B^u
    print(json.dumps({"before": before, "after_init": after_init, "peak": rss(),
                      "rows_with_state": opt.rows_with_state(layer.user_B), "moved": moved,
                      "sparse": layer.user_A.grad.is_sparse}))
""")


@pytest.mark.slow
def test_a_million_user_bank_trains_a_step_without_dense_optimizer_state():
    run = subprocess.run([sys.executable, "-c", MILLION], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    N, d, r, E, B = 1_000_000, 8, 8, 2, 64
    bank = 4 * N * (r * d + d * r + E)  # user_A + user_B + router_user, fp32: 520 MB
    # Parameters once, plus the batch's rows (gradients, optimizer state, gathered copies)
    # and a fixed allowance for the step's temporaries. A dense gradient of the bank alone
    # would add `bank` again; dense Adam moments twice that.
    per_row = 4 * (r * d + d * r + E)
    bound = bank + 64 * B * per_row + 64 * 2**20
    grown = m["peak"] - m["before"]
    assert m["sparse"] and m["moved"] and m["rows_with_state"] == B
    assert grown < bound, (grown / 2**20, bound / 2**20)
    assert grown < 1.5 * bank  # far from the 3x-4x of dense gradients and dense Adam state


def test_state_dict_round_trip_keeps_the_row_bookkeeping_exact_in_bf16():
    p = torch.zeros(1000, 2, dtype=torch.bfloat16, requires_grad=True)
    opt = LazyAdamW([p], lr=0.1)
    rows = torch.tensor([999, 257, 3])
    torch.nn.functional.embedding(rows, p, sparse=True).float().sum().backward()
    opt.step()
    again = LazyAdamW([p], lr=0.1)
    again.load_state_dict(opt.state_dict())
    st, st0 = again.state[p], opt.state[p]
    for key in ("slot", "seen", "row_step"):
        assert st[key].dtype == torch.long and torch.equal(st[key], st0[key]), key
    assert st["exp_avg"].dtype == torch.bfloat16
