"""Edge inputs of the Triton kernels against the float64 reference: NaN / Inf in x and in
the router tables, and batches of zero tokens, forward and backward, for both strategies
of the fused op (every layout of the grouped one) and for the router top-k.

Runs on a GPU, or on the CPU under the Triton interpreter (TRITON_INTERPRET=1, as in CI).
Every buffer the kernels write is poisoned first (NaN / -7), so an element left unwritten
shows up as a NaN where the reference has none.
"""

import os

import pytest
import torch
from _helpers.cases import EDGE, SPECIALS, empty_case, special_case
from _helpers.kernels import LAYOUTS, PARAMS, check_indices, check_specials, poisoned_empty, rel_err, use_layout
from _helpers.kernels import cast as cast_to

from proper_kernels import reference

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from proper_kernels import triton_linear, triton_router  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# Per dtype: the largest error of the finite values of y, the gates and the logits relative
# to the float64 reference's largest magnitude; the gradients get twice it.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# numpy, under the interpreter, warns about the NaN and inf - inf it computes.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]

T, E, K = EDGE.T, EDGE.E, EDGE.K


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Fill every kernel output with NaN (floats) or -7 (ints) before the launch writes it."""
    monkeypatch.setattr(triton_linear, "_empty", poisoned_empty)
    monkeypatch.setattr(triton_router, "_empty", poisoned_empty)


def run_both(case, dtype, strategy, sparse_grad=False):
    """The Triton op and the float64 reference on the same (cast) values, forward and the
    backward of one loss with gradients into y, the logits and the gates."""
    low = cast_to(case, dtype, DEVICE)
    names = [n for n in PARAMS if low[n] is not None]
    ins = {n: low[n].clone().requires_grad_(True) for n in names}
    y, routing = triton_linear.proper_linear(**dict(low, **ins), strategy=strategy, sparse_grad=sparse_grad)
    hi = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in low.items()}
    ins64 = {n: hi[n].clone().requires_grad_(True) for n in names}
    y64, routing64 = reference.proper_linear(**dict(hi, **ins64), sparse_grad=sparse_grad)

    g = torch.Generator().manual_seed(0)
    gy = torch.randn(y64.shape, generator=g, dtype=torch.float64).to(DEVICE)
    gl = torch.randn(routing64.logits.shape, generator=g, dtype=torch.float64).to(DEVICE)
    gg = torch.randn(routing64.gates.shape, generator=g, dtype=torch.float64).to(DEVICE)
    ((y64 * gy).sum() + (routing64.logits * gl).sum() + (routing64.gates * gg).sum()).backward()
    ((y.double() * gy).sum() + (routing.logits.double() * gl).sum() + (routing.gates.double() * gg).sum()).backward()
    return (y, routing, ins), (y64, routing64, ins64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("where,value", SPECIALS, ids=[f"{v}-{w}" for w, v in SPECIALS])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_nan_and_inf_inputs(layout, where, value, dtype, monkeypatch):
    """No crash; indices distinct and in [0, E); y, the routing and dx NaN exactly where the
    reference has NaN, and equal to it elsewhere.

    One known difference: an infinite router_h weight with 16-bit inputs. The kernels add
    h_u W_h^T as two dots (h_u's 16-bit high part and its remainder); where the remainder is
    0, 0 * inf makes a NaN logit where the reference has -inf (a finite row), and the same in
    the backward's d logits W_h. Such rows may be NaN in the kernels only."""
    strategy = use_layout(layout, monkeypatch)
    case = special_case(where, value)
    (y, routing, ins), (y64, routing64, ins64) = run_both(case, dtype, strategy)
    tol = TOL[dtype]
    exact = not (where == "router_h" and value != "nan" and dtype != torch.float32)

    assert y.dtype == dtype and y.shape == y64.shape
    check_indices(routing.indices, E, K)
    nan_gates = check_specials(routing.gates, routing64.gates, tol, "gates", exact)
    check_specials(routing.logits, routing64.logits, tol, "logits", exact)
    nan_y = check_specials(y, y64, tol, "y", exact)
    if value == "nan":
        assert nan_y.any(), "the case must put a NaN into y"
    # Rows the reference routes with finite gates pick the same experts (where they weigh).
    fine = ~nan_gates.any(dim=1).to(DEVICE) if exact else torch.zeros(T, dtype=torch.bool, device=DEVICE)
    weighty = (routing64.gates > 1e-6) & fine[:, None]
    assert torch.equal(routing.indices[weighty], routing64.indices[weighty])

    for n in ins:
        got, want = ins[n].grad, ins64[n].grad
        assert got is not None and got.dtype == dtype and got.shape == want.shape, n
        if n in ("x", "base_out"):  # per token: NaN exactly where the reference has NaN
            check_specials(got, want, tol * 2, f"d{n}", exact)
        elif exact:  # weights sum over tokens: where both are finite, equal
            fin = got.isfinite() & want.isfinite()
            if fin.any():
                assert rel_err(got[fin], want[fin]) <= tol * 2, n


@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense-grad", "sparse-grad"])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["per-token", "per-sequence"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zero_tokens(layout, per_sequence, sparse_grad, monkeypatch):
    """T = 0 with user ids: empty outputs shaped like the reference's, and the gradients the
    reference gives (empty for x, zero for every weight, sparse where it is sparse)."""
    strategy = use_layout(layout, monkeypatch)
    case = empty_case(per_sequence)
    (y, routing, ins), (y64, routing64, ins64) = run_both(case, torch.float32, strategy, sparse_grad)

    assert y.shape == y64.shape == case["base_out"].shape and y.dtype == torch.float32
    assert routing.logits.shape == routing64.logits.shape == (0, E)
    assert routing.gates.shape == routing64.gates.shape == (0, K)
    assert routing.indices.shape == (0, K) and routing.indices.dtype == torch.int64
    for n in ins:
        got, want = ins[n].grad, ins64[n].grad
        assert want is not None, n
        assert got is not None, n
        assert got.shape == want.shape and got.dtype == torch.float32 and got.layout == want.layout, n
        assert torch.count_nonzero(got.to_dense()) == 0, n


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zero_tokens_in_place_without_autograd(layout, monkeypatch):
    strategy = use_layout(layout, monkeypatch)
    low = cast_to(empty_case(False), torch.float16, DEVICE)
    base = low["base_out"]
    with torch.no_grad():
        y, routing = triton_linear.proper_linear(**low, strategy=strategy, inplace=True)
    assert y.shape == base.shape and y.dtype == torch.float16
    assert routing.gates.shape == (0, K) and routing.indices.shape == (0, K)


# -- router top-k -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_router_nan_and_inf(value, dtype):
    """A NaN or +-Inf logit in 16-bit and fp32: gates and d logits NaN exactly where the
    reference has NaN and equal elsewhere; indices distinct, in range, and the reference's on
    the finite rows."""
    n, e, k = 70, 8, 3
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(n, e, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    logits[2, 5] = float(value)
    logits[40, :] = float(value)
    dgates = torch.randn(n, k, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    x = logits.clone().requires_grad_(True)
    gates, indices = triton_router.router_topk(x, k, 0.7)
    gates.backward(dgates)
    x64 = logits.double().requires_grad_(True)
    gates64, indices64 = reference.router_topk(x64, k, 0.7)
    gates64.backward(dgates.double())

    tol = TOL[dtype]
    assert gates.dtype == dtype
    check_indices(indices, e, k)
    nan_rows = check_specials(gates, gates64, tol, "gates").any(dim=1).to(DEVICE)
    assert nan_rows[40] and nan_rows.sum() < n
    assert torch.equal(indices[~nan_rows], indices64[~nan_rows])
    check_specials(x.grad, x64.grad, tol * 2, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_router_zero_tokens(dtype):
    x = torch.empty(0, 8, device=DEVICE, dtype=dtype).requires_grad_(True)
    gates, indices = triton_router.router_topk(x, 2, 0.7)
    assert gates.shape == (0, 2) and gates.dtype == dtype
    assert indices.shape == (0, 2) and indices.dtype == torch.int64
    gates.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 8) and x.grad.dtype == dtype
