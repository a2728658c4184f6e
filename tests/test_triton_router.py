"""The Triton router top-k against the float64 reference, forward and backward.

Runs on a GPU, or on the CPU under the Triton interpreter (TRITON_INTERPRET=1, as in CI).
Every buffer the launchers allocate is poisoned first (NaN / -7), so an element left
unwritten fails.
"""

import math
import os

import pytest
import torch
from _helpers.kernels import poisoned_empty

from proper_kernels import reference

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton router cannot run")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a CUDA device, or TRITON_INTERPRET=1 to run on the CPU", allow_module_level=True)

from proper_kernels import triton_router  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (rtol, atol) per dtype, elementwise. The kernels compute in fp32 (fp64 for fp64 inputs)
# and round once on store; bf16 gets 1e-2 because the interpreter truncates fp32 -> bf16 on
# store (up to 2**-7 relative) where a GPU rounds to nearest.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (1e-2, 1e-3),
}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Fill every kernel output with NaN (floats) or -7 (ints) before the launch writes it."""
    monkeypatch.setattr(triton_router, "_empty", poisoned_empty)


def distinct_logits(T, E, dtype, seed, gap=0.1):
    """Random logits [T, E] with every pair in a row at least gap/2 apart (no near-ties in any
    dtype), as float64 values cast to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(E, generator=g) for _ in range(T)]) if T else torch.empty(0, E)
    x = (ranks.double() - (E - 1) / 2) * gap + torch.rand(T, E, generator=g, dtype=torch.float64) * (gap / 2)
    return x.to(DEVICE, dtype)


def reference_fwd_bwd(logits, top_k, temperature, dgates):
    """The reference on the same (cast) values upcast to float64: same ties, same rule."""
    x64 = logits.detach().double().requires_grad_(True)
    gates, indices = reference.router_topk(x64, top_k, temperature)
    gates.backward(dgates.double())
    return gates.detach(), indices, x64.grad


def triton_fwd_bwd(logits, top_k, temperature, dgates):
    x = logits.detach().clone().requires_grad_(True)
    gates, indices = triton_router.router_topk(x, top_k, temperature)
    gates.backward(dgates)
    return gates.detach(), indices, x.grad


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def check_against_reference(T, E, k, temperature, dtype, seed, gap=0.1):
    logits = distinct_logits(T, E, dtype, seed, gap)
    g = torch.Generator().manual_seed(seed + 1)
    dgates = torch.randn(T, k, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    gates, indices, dlogits = triton_fwd_bwd(logits, k, temperature, dgates)
    gates64, indices64, dlogits64 = reference_fwd_bwd(logits, k, temperature, dgates)
    assert indices.dtype == torch.int64 and indices.shape == (T, k)
    assert torch.equal(indices, indices64)
    assert_close(gates, gates64, dtype, "gates")
    assert_close(dlogits, dlogits64, dtype, "dlogits")


def topk_cases(Es=(1, 4, 16, 33, 64)):
    return [(E, k) for E in Es for k in sorted({1, 2, E}) if k <= E]


# The full shape grid in fp32 with both temperatures; the other dtypes on the widest T.
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("E,k", topk_cases())
@pytest.mark.parametrize("T", [1, 7, 129])
def test_matches_reference_fp32(T, E, k, temperature):
    check_against_reference(T, E, k, temperature, torch.float32, seed=1000 * T + 10 * E + k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("E,k", topk_cases())
def test_matches_reference_dtypes(E, k, dtype):
    temperature = 0.7 if (E + k) % 2 else 1.0
    check_against_reference(129, E, k, temperature, dtype, seed=10 * E + k)


@pytest.mark.parametrize("E,k", [(1000, 2), (1024, 1024)])
def test_widest_router(E, k):
    # A narrower spread keeps every probability above fp32's underflow (which would tie them).
    check_against_reference(3, E, k, 0.7, torch.float32, seed=E + k, gap=0.05)


def test_low_precision_ties_follow_the_cast_values():
    """Logits that collapse to exact ties once cast to fp16 / bf16 pick the lower index, as
    the reference does on the same cast values."""
    base = torch.tensor([[1.0, 1.0 + 1e-4, 0.5, 1.0 - 1e-4, 0.25]], dtype=torch.float64).repeat(3, 1)
    for dtype in (torch.float16, torch.bfloat16):
        logits = base.to(DEVICE, dtype)
        gates, indices = triton_router.router_topk(logits, 3)
        gates64, indices64 = reference.router_topk(logits.double(), 3)
        assert torch.equal(indices, indices64)
        assert_close(gates, gates64, dtype, "gates")


def test_poisoned_out_buffers_are_fully_written():
    """Launchers write every element of caller-given outputs (T not a multiple of BLOCK_T,
    E not a power of two)."""
    T, E, k = 129, 33, 2
    logits = distinct_logits(T, E, torch.float32, seed=7)
    out_gates = torch.full((T, k), float("nan"), device=DEVICE)
    out_indices = torch.full((T, k), -7, dtype=torch.int64, device=DEVICE)
    gates, indices = triton_router.router_topk_forward(logits, k, 0.7, out_gates=out_gates, out_indices=out_indices)
    assert gates is out_gates and indices is out_indices
    assert torch.isfinite(gates).all() and ((indices >= 0) & (indices < E)).all()

    dgates = torch.randn(T, k, device=DEVICE)
    out_dlogits = torch.full((T, E), float("nan"), device=DEVICE)
    dlogits = triton_router.router_topk_backward(logits, indices, dgates, 0.7, out_dlogits=out_dlogits)
    assert dlogits is out_dlogits and torch.isfinite(dlogits).all()

    gates64, indices64, dlogits64 = reference_fwd_bwd(logits, k, 0.7, dgates)
    assert torch.equal(indices, indices64)
    assert_close(gates, gates64, torch.float32, "gates")
    assert_close(dlogits, dlogits64, torch.float32, "dlogits")


def test_exact_ties_go_to_the_lower_index():
    rows = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all equal
            [1.0, 3.0, 3.0, 0.0, 3.0, 2.0],  # a repeated maximum
            [2.0, 1.0, 2.0, 1.0, 2.0, 1.0],  # repeated maximum and repeated runner-up
            [-1.0, 5.0, -1.0, -1.0, 5.0, -1.0],
        ],
        dtype=torch.float64,
    )
    for dtype in (torch.float32, torch.bfloat16):
        logits = rows.to(DEVICE, dtype)
        for k in (1, 2, 4, 6):
            dgates = torch.randn(rows.shape[0], k, dtype=torch.float64).to(DEVICE, dtype)
            gates, indices, dlogits = triton_fwd_bwd(logits, k, 1.0, dgates)
            gates64, indices64, dlogits64 = reference_fwd_bwd(logits, k, 1.0, dgates)
            assert torch.equal(indices, indices64), (dtype, k, indices, indices64)
            assert_close(gates, gates64, dtype, "gates")
            assert_close(dlogits, dlogits64, dtype, "dlogits")
    gates, indices = triton_router.router_topk(torch.zeros(3, 6, device=DEVICE), 4)
    assert torch.equal(indices, torch.arange(4, device=DEVICE).expand(3, 4))
    assert torch.equal(gates, torch.full((3, 4), 0.25, device=DEVICE))


# numpy, under the interpreter, warns about the NaN and inf - inf it computes.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("E,k", [(5, 1), (5, 3), (33, 33), (16, 16)])
def test_nan_rows(E, k):
    """NaN / +Inf / all -Inf rows: NaN gates, indices distinct and in range; other rows as
    the reference, forward and backward."""
    T = 9
    logits = distinct_logits(T, E, torch.float32, seed=E * k)
    logits[1, E // 2] = float("nan")
    logits[3, :] = float("nan")
    logits[4, E - 1] = float("inf")
    logits[6, :] = float("-inf")
    bad = torch.zeros(T, dtype=torch.bool, device=DEVICE)
    bad[[1, 3, 4, 6]] = True
    dgates = torch.randn(T, k, device=DEVICE)
    gates, indices, dlogits = triton_fwd_bwd(logits, k, 0.7, dgates)
    gates64, indices64, dlogits64 = reference_fwd_bwd(logits, k, 0.7, dgates)

    assert torch.isnan(gates[bad]).all()
    assert ((indices >= 0) & (indices < E)).all()
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all(), "indices of a row must be distinct"
    assert torch.equal(indices[~bad], indices64[~bad])
    assert_close(gates[~bad], gates64[~bad], torch.float32, "gates")
    assert_close(dlogits[~bad], dlogits64[~bad], torch.float32, "dlogits")
    assert torch.isnan(dlogits[bad]).all()


def test_gradcheck_float64():
    """The kernels compute in fp64 for fp64 inputs, so finite differences apply directly."""
    logits = distinct_logits(3, 7, torch.float64, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: triton_router.router_topk(x, 3, 0.7)[0], (logits,), eps=1e-6, atol=1e-8)


def test_autograd_details():
    T, E, k = 7, 16, 2
    logits = distinct_logits(T, E, torch.float32, seed=11)
    # A non-contiguous input (a transposed view) gives the same result as its copy.
    view = logits.t().contiguous().t()
    assert not view.is_contiguous()
    g1, i1 = triton_router.router_topk(view, k)
    g2, i2 = triton_router.router_topk(logits, k)
    assert torch.equal(g1, g2) and torch.equal(i1, i2)
    # Gates feed a loss through a broadcast (non-contiguous) gradient; indices carry none.
    x = logits.clone().requires_grad_(True)
    gates, indices = triton_router.router_topk(x, k, 2.0)
    assert not indices.requires_grad
    gates.sum().backward()
    x64 = logits.double().requires_grad_(True)
    reference.router_topk(x64, k, 2.0)[0].sum().backward()
    assert_close(x.grad, x64.grad, torch.float32, "dlogits")
    # Logits that need no gradient give gates that need none.
    assert not triton_router.router_topk(logits, k)[0].requires_grad


def test_empty_batch():
    gates, indices = triton_router.router_topk(torch.empty(0, 8, device=DEVICE), 2)
    assert gates.shape == (0, 2) and indices.shape == (0, 2) and indices.dtype == torch.int64
    dlogits = triton_router.router_topk_backward(
        torch.empty(0, 8, device=DEVICE), indices, torch.empty(0, 2, device=DEVICE)
    )
    assert dlogits.shape == (0, 8)


def test_every_expert_count_has_a_launch_config():
    for E in range(1, triton_router.MAX_EXPERTS + 1):
        for target in ("sm90", "sm80", "interp"):
            block_t, block_e, num_warps, num_stages = triton_router._launch_config(E, target)
            assert block_e >= E and block_t >= 1 and num_warps >= 1 and num_stages >= 1


def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 8, device=DEVICE)
    fwd, bwd = triton_router.router_topk_forward, triton_router.router_topk_backward
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        fwd(x[0], 2)
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        fwd(x[None], 2)
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        fwd(x.long(), 2)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        fwd([[1.0, 2.0]], 1)
    with pytest.raises(ValueError, match="logits must have between 1 and 1024 experts"):
        fwd(torch.randn(2, 1025, device=DEVICE), 1)
    with pytest.raises(ValueError, match="logits must have between 1 and 1024 experts"):
        fwd(torch.randn(2, 0, device=DEVICE), 1)
    for k in (0, 9, -1, 2.0, True, None):
        with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 8\]"):
            fwd(x, k)
    for t in (0.0, -1.0, math.inf, math.nan, "1", None):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            fwd(x, 2, t)
    with pytest.raises(ValueError, match="out_gates must be a contiguous"):
        fwd(x, 2, out_gates=torch.empty(4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="out_indices must be a contiguous"):
        fwd(x, 2, out_indices=torch.empty(4, 2, device=DEVICE, dtype=torch.int32))

    gates, indices = fwd(x, 2)
    with pytest.raises(TypeError, match="indices must be an int64"):
        bwd(x, indices.int(), gates)
    with pytest.raises(ValueError, match=r"indices must have shape \(4, k\)"):
        bwd(x, indices[:3], gates)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 8\]"):
        bwd(x, torch.zeros(4, 9, dtype=torch.int64, device=DEVICE), torch.zeros(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match=r"dgates must have shape \(4, 2\)"):
        bwd(x, indices, gates[:, :1])
    with pytest.raises(TypeError, match="dgates must be a floating-point"):
        bwd(x, indices, indices)
    with pytest.raises(ValueError, match="out_dlogits must be a contiguous"):
        bwd(x, indices, gates, out_dlogits=torch.empty(4, 8, device=DEVICE).t())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="dgates is on cpu but logits is on cuda"):
            bwd(x, indices, gates.cpu())
    # The autograd entry point checks the same way.
    with pytest.raises(ValueError, match="top_k must be an integer"):
        triton_router.router_topk(x, 0)
