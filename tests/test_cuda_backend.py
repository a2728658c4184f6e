"""The CUDA backend (csrc/ ops) against the float64 reference, forward and every gradient.

Each test runs on two targets:
- `gpu`: the built extension on a CUDA GPU (marked `gpu`; skipped, and listed as skipped,
  where there is none);
- `emu`: the same kernels and launchers compiled for the CPU SIMT emulator (csrc/emu/,
  tests/_helpers/emulator.py, docs/DESIGN.md#emulator): every thread, barrier, shuffle and
  mma.sync runs on the CPU, on CPU tensors. It is skipped where no C++ compiler or CUDA
  headers are found, and fails instead where PROPER_EXPECT_CUDA_EXT=1 (CI).
The targets and the poisoning are conftest's `cuda_target` and `on_cuda_target`: every
torch.empty (the ops' outputs and workspaces included, which come from at::empty) is filled
with NaN (ints: their maximum), so an element a kernel leaves unwritten fails the comparison.

Paths: the tensor-core prefill kernels (training, and inference past DECODE_MAX_TOKENS), the
decode kernels (inference on few tokens: checked forward only, under no_grad), and the
BGMV kernels for shapes wider than the tensor-core kernels hold.
"""

import pytest
import torch

import proper_kernels
from _helpers.cases import grid, make_case
from _helpers.kernels import cast, rel_err
from _helpers.kernels import check as check_fn
from proper_kernels import cuda_backend, reference

pytestmark = pytest.mark.usefixtures("on_cuda_target")


# Per dtype: the largest error of y, the gates and the logits relative to the float64
# reference's largest magnitude; every gradient gets twice it.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def run_cuda(**kw):
    return cuda_backend.proper_linear(**kw)


def check(case, dtype, cuda_target):
    """Forward and every gradient against the float64 reference, within TOL[dtype]."""
    check_fn(case, dtype, cuda_target.device, run_cuda, TOL[dtype])


def check_forward(case, dtype, cuda_target, **kw):
    """Inference (no_grad) forward against the float64 reference."""
    low = cast(case, dtype, cuda_target.device)
    # the reference's inputs first: with inplace=True the op adds into base_out's memory
    hi = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in low.items()}
    y64, r64 = reference.proper_linear(**hi)
    with torch.no_grad():
        y, routing = cuda_backend.proper_linear(**dict(low, **kw))
    if kw.get("inplace"):
        assert y.data_ptr() == low["base_out"].data_ptr(), "inplace=True: y is base_out's memory"

    tol = TOL[dtype]
    weighty = r64.gates > 1e-6
    assert torch.equal(routing.indices[weighty], r64.indices[weighty])
    assert rel_err(routing.gates, r64.gates) <= tol
    assert rel_err(routing.logits, r64.logits) <= tol
    assert rel_err(y, y64) <= tol


@pytest.mark.parametrize("T,d_in,d_out,E,k,r,r_u,sources,cold", grid())
def test_fp32_decode_kernels_match_reference(T, d_in, d_out, E, k, r, r_u, sources, cold, cuda_target):
    case = make_case(T * 7 + E * 3 + r, T, d_in, d_out, E, k, r, r_u, 6, sources, cold=cold)
    check_forward(case, torch.float32, cuda_target)


@pytest.mark.parametrize("T,d_in,d_out,E,k,r,r_u,sources,cold", grid())
def test_fp32_tensor_core_path_matches_reference(T, d_in, d_out, E, k, r, r_u, sources, cold, cuda_target):
    """Training (inputs need grads) always takes the prefill kernels when the shape fits."""
    assert cuda_backend.tensor_core_fits(E, r, r_u, True)
    case = make_case(T * 5 + E + r, T, d_in, d_out, E, k, r, r_u, 6, sources, cold=cold)
    check(case, torch.float32, cuda_target)


@pytest.mark.parametrize("T,d_in,d_out,E,k,r,r_u,sources,cold", grid()[::3])
def test_fp32_prefill_inference_matches_reference(T, d_in, d_out, E, k, r, r_u, sources, cold, monkeypatch,
                                                  cuda_target):
    monkeypatch.setattr(cuda_backend, "DECODE_MAX_TOKENS", 0)
    case = make_case(T * 3 + E + r, T, d_in, d_out, E, k, r, r_u, 6, sources, cold=cold)
    check_forward(case, torch.float32, cuda_target)
    check_forward(case, torch.float32, cuda_target, inplace=True)


@pytest.mark.parametrize("T,d_in,d_out,E,k,r,r_u,sources,cold", grid()[::3])
def test_fp32_bgmv_path_matches_reference(T, d_in, d_out, E, k, r, r_u, sources, cold, monkeypatch, cuda_target):
    """Shapes past the tensor-core kernels' columns run the per-token BGMV kernels."""
    monkeypatch.setattr(cuda_backend, "PREFILL_MAX_COLUMNS", 0)
    case = make_case(T * 5 + E + r + 1, T, d_in, d_out, E, k, r, r_u, 6, sources, cold=cold)
    check(case, torch.float32, cuda_target)


def test_wide_shape_takes_the_bgmv_path(cuda_target):
    assert not cuda_backend.tensor_core_fits(64, 4, 16, True)
    case = make_case(3, 70, 40, 24, 64, 8, 4, 16, 5, ("token", "user", "lora"))
    check(case, torch.float32, cuda_target)


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "T,d_in,d_out,E,k,r,r_u,sources",
    [(1, 5, 3, 1, 1, 4, 8, ("user",)), (7, 70, 37, 4, 2, 16, 8, ("token", "user", "lora")),
     (300, 130, 67, 16, 2, 4, 0, ("token",)), (33, 20, 9, 64, 8, 4, 8, ("lora",))],
)
def test_half_precision_matches_reference(dtype, T, d_in, d_out, E, k, r, r_u, sources, decode, monkeypatch,
                                          cuda_target):
    """decode: the decode kernels' forward; else the tensor-core path, forward and gradients
    (the bf16 and fp16 mma instructions), or the BGMV kernels where the shape is too wide."""
    case = make_case(11 + T + E, T, d_in, d_out, E, k, r, r_u, 6, sources)
    for name in ("lora_A", "lora_B", "user_A", "user_B"):
        if case[name] is not None:
            case[name] = case[name] * 0.3
    if decode:
        check_forward(case, dtype, cuda_target)
    else:
        monkeypatch.setattr(cuda_backend, "DECODE_MAX_TOKENS", 0)
        check(case, dtype, cuda_target)
        check_forward(case, dtype, cuda_target)


def test_per_sequence_ids_and_dropout_input(cuda_target):
    case = make_case(8, 24, 13, 10, 4, 2, 4, 8, 5, ("token", "user", "lora"), per_sequence=True, seq_len=6)
    check(case, torch.float32, cuda_target)
    case = make_case(9, 12, 14, 6, 4, 2, 4, 8, 5, ("token", "user", "lora"))
    case["x_lora"] = case["x"] * (torch.rand(case["x"].shape) > 0.3) / 0.7
    low = {k: (v.to(cuda_target.device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    low = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in low.items()}
    y, _ = cuda_backend.proper_linear(**low)
    hi = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in low.items()}
    y64, _ = reference.proper_linear(**hi)
    assert rel_err(y, y64) <= 1e-5


@pytest.mark.parametrize("E,k", [(1, 1), (8, 2), (33, 5), (64, 8), (1024, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_topk_matches_reference(E, k, dtype, cuda_target):
    logits = (torch.randn(129, E, dtype=torch.float64) * 3).to(cuda_target.device, dtype).requires_grad_(True)
    if cuda_target.name == "gpu":  # through the dispatcher
        gates, idx = proper_kernels.router_topk(logits, k, 0.7, backend="cuda")
    else:
        gates, idx = cuda_backend.router_topk(logits, k, 0.7)
    ref_in = logits.detach().double().requires_grad_(True)
    g64, i64 = reference.router_topk(ref_in, k, 0.7)
    weighty = g64 > 1e-6
    assert torch.equal(idx[weighty], i64[weighty])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(gates, g64) <= tol
    dg = torch.randn_like(g64)
    (gates.double() * dg).sum().backward()
    (g64 * dg).sum().backward()
    assert rel_err(logits.grad, ref_in.grad) <= 2 * tol


@pytest.mark.no_launch
def test_dispatcher_picks_cuda_on_a_gpu(cuda_target):
    if cuda_target.name != "gpu":
        pytest.skip("the dispatcher's choice on a CUDA device")
    assert proper_kernels.select_backend("auto", "cuda", torch.bfloat16, phase="decode", tokens=64) == "cuda"


def test_index_checks_name_the_argument(cuda_target):
    x = torch.randn(4, 8, device=cuda_target.device)
    w = torch.randn(3, 2, 8, device=cuda_target.device)
    with pytest.raises(RuntimeError, match="'indices' contains 3"):
        cuda_target.ops.bgmv_shrink(x, w, torch.tensor([[0], [1], [3], [-1]], device=cuda_target.device))
    h = cuda_target.ops.bgmv_shrink(x, w, torch.tensor([[0], [1], [2], [-1]], device=cuda_target.device))
    assert torch.equal(h[3], torch.zeros_like(h[3]))
