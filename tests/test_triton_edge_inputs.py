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
from _helpers.kernels import (LAYOUTS, check_indices, check_router_nan_and_inf, check_router_zero_tokens,
                              check_special_grads, check_specials, poisoned_empty, run_with_reference,
                              use_layout)
from _helpers.kernels import cast as cast_to


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
    """The Triton op and the float64 reference, forward and backward (run_with_reference)."""
    def fn(**kw):
        return triton_linear.proper_linear(**kw, strategy=strategy, sparse_grad=sparse_grad)
    return run_with_reference(case, dtype, DEVICE, fn, sparse_grad=sparse_grad)


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

    check_special_grads(ins, ins64, dtype, tol * 2, exact)


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
    """A NaN or +-Inf logit in 16-bit and fp32 (check_router_nan_and_inf)."""
    check_router_nan_and_inf(triton_router.router_topk, value, dtype, DEVICE, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_router_zero_tokens(dtype):
    check_router_zero_tokens(triton_router.router_topk, dtype, DEVICE)
