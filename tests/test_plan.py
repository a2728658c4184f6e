"""The per-batch plan: tokens grouped by user, built on the device without a host sync."""

import os

import pytest
import torch

from proper_kernels.plan import ORDER, RUN, RUN_END, RUN_START, RUN_USER, UID, build_plan, max_runs


def expected(uid):
    """The plan of per-token ids, by plain Python."""
    T = len(uid)
    order = sorted(range(T), key=lambda t: (uid[t], t))
    runs = []
    for p, t in enumerate(order):
        if not runs or runs[-1][0] != uid[t]:
            runs.append([uid[t], p, p + 1])
        else:
            runs[-1][2] = p + 1
    run_of = []
    for r, (_, s, e) in enumerate(runs):
        run_of += [r] * (e - s)
    pad = T - len(runs)
    return dict(order=order, run=run_of, run_user=[u for u, _, _ in runs] + [-1] * pad,
                run_start=[s for _, s, _ in runs] + [T] * pad, run_end=[e for _, _, e in runs] + [T] * pad)


@pytest.mark.parametrize("seed", range(4))
def test_per_token_ids_group_by_user_stably(seed):
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(1, 40, (1,), generator=g))
    ids = torch.randint(-1, 6, (T,), generator=g)
    plan = build_plan(ids, torch.Size([T]), torch.device("cpu"), num_users=6)
    want = expected(ids.tolist())
    t = plan.table
    assert t.shape == (6, T) and t.dtype == torch.long
    assert t[UID].tolist() == ids.tolist()
    for row, name in ((ORDER, "order"), (RUN, "run"), (RUN_USER, "run_user"), (RUN_START, "run_start"),
                      (RUN_END, "run_end")):
        assert t[row].tolist() == want[name], name
    assert plan.groups == 0 and plan.max_runs == min(T, 7)


def test_per_sequence_ids_expand_to_tokens_and_bound_the_runs():
    ids = torch.tensor([3, -1, 3, 0])
    plan = build_plan(ids, torch.Size([4, 5]), torch.device("cpu"), num_users=10)
    assert plan.user_ids.tolist() == sum(([u] * 5 for u in ids.tolist()), [])
    assert plan.groups == 4 and plan.max_runs == 4
    # users -1, 0, 3: three runs; user 3's two sequences are one run, in token order
    assert plan.table[RUN_USER, :3].tolist() == [-1, 0, 3]
    assert plan.table[ORDER, 10:20].tolist() == list(range(0, 5)) + list(range(10, 15))


def test_no_ids_is_one_run_of_users_without_a_row():
    plan = build_plan(None, torch.Size([2, 3]), torch.device("cpu"))
    assert plan.user_ids.tolist() == [-1] * 6
    assert plan.table[RUN].tolist() == [0] * 6
    assert plan.table[RUN_USER, 0].item() == -1 and plan.table[RUN_END, 0].item() == 6


def test_built_on_meta_tensors_so_no_step_reads_a_value_back():
    """A meta tensor has no values: any host sync (a .item(), a boolean index) would fail."""
    plan = build_plan(torch.empty(64, dtype=torch.long, device="meta"), torch.Size([64]), torch.device("meta"), 100)
    assert plan.table.device.type == "meta" and plan.max_runs == 64
    assert max_runs(8192, 8, 1000) == 8 and max_runs(64, 0, 10) == 11


@pytest.mark.parametrize("per_sequence", [False, True])
def test_fused_linear_takes_the_plan_and_the_weights(per_sequence):
    """The op by its contract (plan + weights) gives what proper_linear gives from user ids."""
    import proper_kernels
    from _helpers.cases import make_case

    case = make_case(4, 12, 10, 7, 4, 2, 3, 2, 5, ("token", "user", "lora"), per_sequence=per_sequence, seq_len=3)
    names = ("lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")
    weights = proper_kernels.AdapterWeights(*(case[n] for n in names))
    plan = proper_kernels.build_plan(case["user_ids"], case["x"].shape[:-1], case["x"].device, num_users=5)
    y, r = proper_kernels.fused_linear(case["x"], case["base_out"], weights, plan, scaling=case["scaling"],
                                       top_k=case["top_k"], temperature=case["temperature"],
                                       user_scaling=case["user_scaling"], return_routing=True)
    y0, r0 = proper_kernels.proper_linear(**case, return_routing=True)
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    assert torch.equal(r.indices, r0.indices)
    with pytest.raises(TypeError, match="AdapterWeights"):
        proper_kernels.fused_linear(case["x"], case["base_out"], dict(lora_A=1), plan, scaling=1.0, top_k=1)
    with pytest.raises(ValueError, match="plan was built for"):
        other = proper_kernels.build_plan(None, torch.Size([3]), case["x"].device)
        proper_kernels.fused_linear(case["x"], case["base_out"], weights, other, scaling=1.0, top_k=1)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the Triton backend needs a GPU or TRITON_INTERPRET=1")
def test_one_plan_per_forward_shared_by_every_layer_and_the_backward(monkeypatch):
    """proper.user_context's batch: the first layer builds the plan, the others (and the
    backward) reuse it; a new batch builds a new one."""
    import proper
    from _helpers.models import tiny_llama
    from proper_kernels import plan as plan_mod

    calls = []
    real = plan_mod.build_plan
    counting = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(plan_mod, "build_plan", counting)
    from proper_kernels import triton_linear

    monkeypatch.setattr(triton_linear, "build_plan", counting)  # where a layer without a plan would build one
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    model = tiny_llama().to(device)
    cfg = proper.ProperConfig(num_experts=2, top_k=1, rank=2, user_rank=2, num_users=6,
                              router=("token", "user", "lora"), backend="triton")
    proper.patch_model(model, cfg)
    assert len(proper.proper_layers(model)) == 6
    ids = torch.randint(0, 64, (3, 5), device=device)
    for users in ([0, 5, -1], [2, 2, 1]):
        with proper.user_context(model, users):
            model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2  # one per batch, for 6 layers, forward and backward
    layer = next(iter(proper.proper_layers(model).values()))
    assert layer.last_backend == "triton"
