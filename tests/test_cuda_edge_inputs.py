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
from _helpers.kernels import PARAMS, cast, check_indices, check_specials, rel_err
from proper_kernels import cuda_backend, reference

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
    """The CUDA backend and the float64 reference on the same (cast) values; when `train`,
    also the backward of one loss with gradients into y, the logits and the gates."""
    low = cast(case, dtype, device)
    names = [n for n in PARAMS if low[n] is not None]
    hi = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in low.items()}
    ins64 = {n: hi[n].clone().requires_grad_(True) for n in names}
    y64, routing64 = reference.proper_linear(**dict(hi, **ins64))
    if not train:
        with torch.no_grad():
            y, routing = cuda_backend.proper_linear(**low)
        return (y, routing, {}), (y64, routing64, {})
    ins = {n: low[n].clone().requires_grad_(True) for n in names}
    y, routing = cuda_backend.proper_linear(**dict(low, **ins))
    g = torch.Generator().manual_seed(0)
    gy = torch.randn(y64.shape, generator=g, dtype=torch.float64).to(device)
    gl = torch.randn(routing64.logits.shape, generator=g, dtype=torch.float64).to(device)
    gg = torch.randn(routing64.gates.shape, generator=g, dtype=torch.float64).to(device)
    ((y64 * gy).sum() + (routing64.logits * gl).sum() + (routing64.gates * gg).sum()).backward()
    ((y.double() * gy).sum() + (routing.logits.double() * gl).sum() + (routing.gates.double() * gg).sum()).backward()
    return (y, routing, ins), (y64, routing64, ins64)


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
    for n in ins:
        got, want = ins[n].grad, ins64[n].grad
        assert got is not None and got.dtype == dtype and got.shape == want.shape, n
        if n in ("x", "base_out"):  # per token: NaN exactly where the reference has NaN
            check_specials(got, want, tol * 2, f"d{n}")
        else:  # weights sum over tokens: where both are finite, equal
            fin = got.isfinite() & want.isfinite()
            if fin.any():
                assert rel_err(got[fin], want[fin]) <= tol * 2, n


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
    """A NaN or +-Inf logit: gates and d logits NaN exactly where the reference has NaN and
    equal elsewhere; indices distinct, in range, and the reference's on the finite rows."""
    n, e, k = 70, 8, 3
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(n, e, generator=g, dtype=torch.float64).to(cuda_target.device, dtype)
    logits[2, 5] = float(value)
    logits[40, :] = float(value)
    dgates = torch.randn(n, k, generator=g, dtype=torch.float64).to(cuda_target.device, dtype)
    x = logits.clone().requires_grad_(True)
    gates, indices = cuda_backend.router_topk(x, k, 0.7)
    gates.backward(dgates)
    x64 = logits.double().requires_grad_(True)
    gates64, indices64 = reference.router_topk(x64, k, 0.7)
    gates64.backward(dgates.double())
    tol = TOL[dtype]
    assert gates.dtype == dtype
    check_indices(indices, e, k)
    nan_rows = check_specials(gates, gates64, tol, "gates").any(dim=1).to(gates.device)
    assert nan_rows[40] and nan_rows.sum() < n
    assert torch.equal(indices[~nan_rows], indices64[~nan_rows])
    check_specials(x.grad, x64.grad, tol * 2, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.no_launch
def test_router_zero_tokens(dtype, cuda_target):
    x = torch.empty(0, 8, device=cuda_target.device, dtype=dtype).requires_grad_(True)
    gates, indices = cuda_backend.router_topk(x, 2, 0.7)
    assert gates.shape == (0, 2) and gates.dtype == dtype
    assert indices.shape == (0, 2) and indices.dtype == torch.int64
    gates.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 8) and x.grad.dtype == dtype
