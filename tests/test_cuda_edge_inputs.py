"""Edge inputs of the CUDA backend against the float64 reference: NaN / Inf in x and in the
router tables, and batches of zero tokens, on each of its paths, and the same for its
router top-k. The cases are the Triton edge tests' (tests/_helpers/cases.py).

Targets and poisoning as in test_cuda_backend.py (conftest's `cuda_target`): the CPU SIMT
emulator everywhere, a GPU where there is one. Every fresh allocation is NaN, so an element
a kernel leaves unwritten shows up where the reference has none.
"""

import pytest
import torch

from _helpers.cases import EDGE, SPECIALS, empty_case, special_case
from _helpers.kernels import (cast, check_indices, check_router_nan_and_inf, check_router_zero_tokens,
                              check_special_grads, check_specials, run_with_reference)
from proper_kernels import cuda_backend

pytestmark = [
    pytest.mark.usefixtures("on_cuda_target"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# prefill and bgmv: training (forward and backward); decode and prefill-inference: no_grad.
PATHS = ["prefill", "bgmv", "decode", "prefill-inference"]


def use_path(path, monkeypatch):
    if path == "bgmv":
        monkeypatch.setattr(cuda_backend, "PREFILL_MAX_COLUMNS", 0)
    if path == "prefill-inference":
        monkeypatch.setattr(cuda_backend, "DECODE_MAX_TOKENS", 0)
    return path in ("prefill", "bgmv")


def run_both(case, dtype, device, train):
    """The CUDA backend and the float64 reference (run_with_reference)."""
    return run_with_reference(case, dtype, device, cuda_backend.proper_linear, train)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("where,value", SPECIALS, ids=[f"{v}-{w}" for w, v in SPECIALS])
@pytest.mark.parametrize("path", PATHS)
def test_nan_and_inf_inputs(path, where, value, dtype, cuda_target, monkeypatch):
    """No crash; indices distinct and in [0, E); y, the routing and dx NaN exactly where the
    reference has NaN, and equal to it elsewhere; the weight gradients equal where both are
    finite."""
    train = use_path(path, monkeypatch)
    (y, routing, ins), (y64, routing64, ins64) = run_both(special_case(where, value), dtype, cuda_target.device, train)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == y64.shape
    check_indices(routing.indices, EDGE.E, EDGE.K)
    nan_gates = check_specials(routing.gates, routing64.gates, tol, "gates")
    check_specials(routing.logits, routing64.logits, tol, "logits")
    nan_y = check_specials(y, y64, tol, "y")
    if value == "nan":
        assert nan_y.any(), "the case must put a NaN into y"
    fine = ~nan_gates.any(dim=1).to(y.device)
    weighty = (routing64.gates > 1e-6) & fine[:, None]
    assert torch.equal(routing.indices[weighty], routing64.indices[weighty])
    check_special_grads(ins, ins64, dtype, tol * 2)


@pytest.mark.parametrize("per_sequence", [False, True], ids=["per-token", "per-sequence"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.no_launch  # T = 0 launches nothing
def test_zero_tokens(path, per_sequence, cuda_target, monkeypatch):
    """T = 0 with user ids: empty outputs shaped like the reference's, and the gradients the
    reference gives (empty for x, zero for every weight)."""
    train = use_path(path, monkeypatch)
    case = empty_case(per_sequence)
    (y, routing, ins), (y64, routing64, ins64) = run_both(case, torch.float32, cuda_target.device, train)
    assert y.shape == y64.shape == case["base_out"].shape and y.dtype == torch.float32
    assert routing.logits.shape == routing64.logits.shape == (0, EDGE.E)
    assert routing.gates.shape == routing64.gates.shape == (0, EDGE.K)
    assert routing.indices.shape == (0, EDGE.K) and routing.indices.dtype == torch.int64
    for n in ins:
        got, want = ins[n].grad, ins64[n].grad
        assert got is not None and want is not None, n
        assert got.shape == want.shape and got.dtype == torch.float32, n
        assert torch.count_nonzero(got) == 0, n


@pytest.mark.no_launch
def test_zero_tokens_in_place_without_autograd(cuda_target, monkeypatch):
    monkeypatch.setattr(cuda_backend, "DECODE_MAX_TOKENS", 0)
    low = cast(empty_case(False), torch.float16, cuda_target.device)
    base = low["base_out"]
    with torch.no_grad():
        y, routing = cuda_backend.proper_linear(**low, inplace=True)
    assert y.shape == base.shape and y.dtype == torch.float16
    assert routing.gates.shape == (0, EDGE.K) and routing.indices.shape == (0, EDGE.K)


# -- router top-k -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_router_nan_and_inf(value, dtype, cuda_target):
    """A NaN or +-Inf logit (check_router_nan_and_inf)."""
    check_router_nan_and_inf(cuda_backend.router_topk, value, dtype, cuda_target.device, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.no_launch
def test_router_zero_tokens(dtype, cuda_target):
    check_router_zero_tokens(cuda_backend.router_topk, dtype, cuda_target.device)
