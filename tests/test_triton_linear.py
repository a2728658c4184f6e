"""The fused Triton proper_linear against the float64 reference, forward and every gradient.

Runs on a GPU, or on the CPU under the Triton interpreter (TRITON_INTERPRET=1, as in CI).
Every buffer the kernels write is poisoned first, so an element left unwritten fails.
"""

import os

import pytest
import torch

import proper_kernels
from proper_kernels import reference
from _helpers.cases import grid, make_case
from _helpers.kernels import cast as cast_to
from _helpers.kernels import check as check_fn
from _helpers.kernels import poisoned_empty, rel_err

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from proper_kernels import triton_linear  # noqa: E402


def cast(case, dtype):
    return cast_to(case, dtype, DEVICE)


def check(case, dtype, strategy):
    """Forward and every gradient against the float64 reference, within TOL[dtype]."""
    check_fn(case, dtype, DEVICE, lambda **kw: triton_linear.proper_linear(**kw, strategy=strategy), TOL[dtype])


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Per dtype: the largest error of y, the gates and the logits relative to the float64
# reference's largest magnitude; every gradient gets twice it.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Fill every kernel output with NaN (floats) or -7 (ints) before the launch writes it."""
    monkeypatch.setattr(triton_linear, "_empty", poisoned_empty)


STRATEGIES = ["dense", "grouped"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("T,d_in,d_out,E,k,r,r_u,sources,cold", grid())
def test_fp32_matches_reference(T, d_in, d_out, E, k, r, r_u, sources, cold, strategy):
    case = make_case(T * 7 + E * 3 + r, T, d_in, d_out, E, k, r, r_u, 6, sources, cold=cold)
    check(case, torch.float32, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "T,d_in,d_out,E,k,r,r_u,sources",
    [(1, 5, 3, 1, 1, 4, 8, ("user",)), (7, 70, 37, 4, 2, 16, 8, ("token", "user", "lora")),
     (129, 130, 67, 16, 2, 4, 0, ("token",)), (33, 20, 9, 4, 4, 4, 8, ("lora",))],
)
def test_half_precision_matches_reference(dtype, T, d_in, d_out, E, k, r, r_u, sources, strategy):
    case = make_case(11 + T + E, T, d_in, d_out, E, k, r, r_u, 6, sources)
    for name in ("lora_A", "lora_B", "user_A", "user_B"):  # keep values in a range fp16 holds well
        if case[name] is not None:
            case[name] = case[name] * 0.3
    check(case, dtype, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_users_cold_and_all_known(strategy):
    case = make_case(5, 9, 10, 11, 4, 2, 4, 8, 5, ("token", "user", "lora"))
    case["user_ids"] = torch.full((9,), -1)
    check(case, torch.float32, strategy)
    case["user_ids"] = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3])
    check(case, torch.float32, strategy)
    case["user_ids"] = None
    check(case, torch.float32, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_per_sequence_user_ids(strategy):
    case = make_case(8, 24, 13, 10, 4, 2, 4, 8, 5, ("token", "user", "lora"), per_sequence=True, seq_len=6)
    check(case, torch.float32, strategy)


@pytest.mark.parametrize("mode", ["dense-shrink", "gathered-shrink", "atomic-expand"])
@pytest.mark.parametrize("E,k,r", [(64, 8, 16), (33, 3, 4)])
def test_grouped_strategy_with_many_experts(E, k, r, mode, monkeypatch):
    """The shapes the grouped strategy exists for: E*r past the dense tile. Its three
    layouts: a dense shrink (every expert's h), a shrink gathered per (token, slot) pair with
    the expand and dx from a dense [T, E*r] layout, and atomic expand and dx."""
    from proper_kernels import triton_grouped

    wide = mode != "atomic-expand"
    monkeypatch.setattr(triton_grouped, "WIDE_MAX_COLUMNS", 4096 if wide else 0)
    monkeypatch.setattr(triton_grouped, "WIDE_SHRINK_PER_SLOT", 1024 if mode == "dense-shrink" else 0)
    case = make_case(E + k, 40, 20, 18, E, k, r, 8, 6, ("token", "user", "lora"))
    check(case, torch.float32, "grouped")
    if wide:
        check(case, torch.float16, "grouped")
    assert triton_linear.choose_strategy(E, r) == "grouped"


def test_grouped_dense_shrink_with_a_rank_that_splits_the_column_chunks(monkeypatch):
    """r = 3 does not divide the dense backward's column chunks: the pair-wise d(g*h) runs."""
    from proper_kernels import triton_grouped

    monkeypatch.setattr(triton_grouped, "WIDE_SHRINK_PER_SLOT", 1024)
    case = make_case(5, 40, 20, 18, 12, 2, 3, 8, 6, ("token", "user", "lora"))
    low = cast(case, torch.float32)
    s = triton_linear._Call(low["x"].reshape(-1, 20), low["lora_A"], low["lora_B"], 2, 8, "grouped")
    assert s.wide_shrink and not s.wide_bwd
    check(case, torch.float32, "grouped")


def test_strategies_agree():
    case = cast(make_case(21, 50, 30, 20, 8, 2, 8, 4, 6, ("token", "user", "lora")), torch.float32)
    outs = {}
    for strategy in STRATEGIES:
        ins = {n: case[n].clone().requires_grad_(True) for n in ("x", "lora_A", "lora_B", "router_x", "user_A")}
        y, routing = triton_linear.proper_linear(**dict(case, **ins), strategy=strategy)
        (y.square().sum() + routing.logits.sum()).backward()
        outs[strategy] = (y, routing.indices, {n: t.grad for n, t in ins.items()})
    (yd, idd, gd), (yg, idg, gg) = outs["dense"], outs["grouped"]
    assert torch.equal(idd, idg)
    assert rel_err(yg, yd) <= 1e-5
    for n in gd:
        assert rel_err(gg[n], gd[n]) <= 2e-5, n


def test_separate_dropout_input():
    """x feeds the token router, x_lora (x after dropout) the LoRAs: both get their gradient."""
    case = make_case(9, 12, 14, 6, 4, 2, 4, 8, 5, ("token", "user", "lora"))
    case["x_lora"] = case["x"] * (torch.rand(case["x"].shape, generator=torch.Generator().manual_seed(1)) > 0.3) / 0.7
    low = cast(case, torch.float32)
    x = low["x"].clone().requires_grad_(True)
    xl = low["x_lora"].clone().requires_grad_(True)
    y, _ = triton_linear.proper_linear(**dict(low, x=x, x_lora=xl))
    hi = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in low.items()}
    x64 = hi["x"].clone().requires_grad_(True)
    xl64 = hi["x_lora"].clone().requires_grad_(True)
    y64, _ = reference.proper_linear(**dict(hi, x=x64, x_lora=xl64))
    assert rel_err(y, y64) <= 1e-5
    y.sum().backward()
    y64.sum().backward()
    assert rel_err(x.grad, x64.grad) <= 2e-5 and rel_err(xl.grad, xl64.grad) <= 2e-5


def test_dispatcher_runs_triton_and_says_so():
    case = cast(make_case(2, 5, 6, 7, 4, 2, 4, 8, 5, ("token", "user", "lora")), torch.float32)
    y = proper_kernels.proper_linear(**case, backend="triton")
    assert proper_kernels.last_backend() == "triton"
    y_ref = proper_kernels.proper_linear(**case, backend="torch")
    assert rel_err(y, y_ref) <= 1e-5


def test_dense_strategy_limit_is_a_clear_error():
    case = cast(make_case(2, 3, 6, 7, 32, 2, 16, 0, 5, ("token",)), torch.float32)  # E*r = 512
    with pytest.raises(ValueError, match="E\\*r <= 256"):
        triton_linear.proper_linear(**case, strategy="dense")
    with pytest.raises(ValueError, match="strategy must be one of"):
        triton_linear.proper_linear(**case, strategy="sparse")


@pytest.mark.parametrize("target", ["sm90", "sm80"])
@pytest.mark.parametrize("T,d_in,d_out,E,k,r,r_u,sources", [
    (1, 70, 37, 4, 2, 16, 8, ("token", "user", "lora")),  # decode: 16-token tiles, split-K shrink + _route
    (40, 130, 67, 8, 2, 16, 8, ("token", "user", "lora")),  # decode, several users per tile
    (300, 70, 37, 4, 2, 4, 8, ("user", "lora")),  # prefill: 64-token tiles, runs across tiles
    (129, 70, 37, 16, 16, 16, 8, ("token", "user")),  # E*r = 256 (k = E)
])
def test_gpu_launch_configurations_match_the_reference(target, T, d_in, d_out, E, k, r, r_u, sources):
    """The configurations a GPU gets (tile heights, split-K, warps), run under the interpreter."""
    from proper_kernels import launch

    case = make_case(3 + T + E, T, d_in, d_out, E, k, r, r_u, 6, sources)
    with launch.force_target(target):
        check(case, torch.float32, "dense")
        if T == 300:
            check(case, torch.float16, "dense")


def test_dots_take_the_input_dtype():
    """fp16 goes to tl.dot as it is (tensor cores on a GPU); bf16 only under the interpreter is
    upcast (the interpreter holds bf16 as raw words); fp32 stays fp32."""
    import triton.language as tl

    assert triton_linear._dot_dtype(torch.float16) == tl.float16
    assert triton_linear._dot_dtype(torch.float32) == tl.float32
    want_bf16 = tl.float32 if os.environ.get("TRITON_INTERPRET") == "1" else tl.bfloat16
    assert triton_linear._dot_dtype(torch.bfloat16) == want_bf16


def test_without_autograd_the_adapters_are_added_into_base_out():
    case = cast(make_case(5, 33, 20, 9, 4, 2, 4, 3, 6, ("token", "user", "lora")), torch.float16)
    ref, _ = triton_linear.proper_linear(**dict(case, base_out=case["base_out"].clone()))
    base = case["base_out"].clone()
    with torch.no_grad():
        y, _ = triton_linear.proper_linear(**dict(case, base_out=base), inplace=True)
    assert y.data_ptr() == base.data_ptr()
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_scaling_zero_gives_the_experts_no_gradient(backend):
    """One convention on every backend: with the group level off (scaling 0) lora_A and
    lora_B are off the graph (None), as in plain autograd of a skipped product."""
    case = cast(make_case(9, 7, 20, 9, 4, 2, 4, 3, 6, ("token", "user")), torch.float32)
    ins = {n: case[n].clone().requires_grad_(True) for n in ("x", "lora_A", "lora_B", "user_A")}
    y = proper_kernels.proper_linear(**dict(case, **ins, scaling=0.0), backend=backend)
    y.square().sum().backward()
    assert ins["lora_A"].grad is None and ins["lora_B"].grad is None
    assert ins["x"].grad is not None and ins["user_A"].grad is not None
