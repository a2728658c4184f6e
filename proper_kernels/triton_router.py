"""Router top-k in Triton: softmax(logits / temperature), keep the top k, renormalise.

Same contract as ``proper_kernels.reference.router_topk`` for logits [T, E]:
gates [T, k] in the input dtype, indices [T, k] int64, best first, ties to the lower expert
index; a NaN (or +Inf) anywhere in a row makes every gate of that row NaN while its indices
stay distinct expert numbers in [0, E).

Reads top to bottom: the two kernels, the launchers ``router_topk_forward`` /
``router_topk_backward`` (check inputs, pick block sizes, launch), then ``RouterTopK`` (the
autograd Function that only calls the launchers) and ``router_topk``.

One program handles BLOCK_T tokens and all E experts of each (E <= 1024, padded to BLOCK_E,
a power of two; padded columns count as -inf). The math runs in float32 for fp16, bf16 and
fp32 inputs and in float64 for fp64 inputs; the temperature travels as two fp32 scalars
(1/temperature split into a high and a low part) so the fp64 path keeps the full precision.
The backward recomputes the probabilities from the logits instead of saving them.
"""

from __future__ import annotations

import math
import struct
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch as _launch
from .triton_utils import softmax_rows, topk_backward, topk_select

__all__ = ["MAX_EXPERTS", "router_topk_forward", "router_topk_backward", "RouterTopK", "router_topk"]

# Widest router one program holds (all E experts of a token live in one tile).
MAX_EXPERTS = 1024

# Launch configurations: launch.CONFIGS[("router_topk", target, "any", BLOCK_E)], BLOCK_E being E
# padded to a power of two, at least 16.
_MIN_BLOCK_E = 16


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# -- kernels ----------------------------------------------------------------------------------


@triton.jit
def _router_topk_fwd_kernel(
    logits_ptr, gates_ptr, indices_ptr, T, inv_t_hi, inv_t_lo,
    E: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr,
):
    """gates [T, TOP_K], indices [T, TOP_K] from logits [T, E] (all contiguous).

    Top-k by TOP_K rounds of: the max over the experts not taken yet, the lowest index among
    those equal to it (ties to the lower index), record, remove. In a NaN row no comparison
    holds; each round then takes the lowest index not taken yet, so the indices stay distinct
    and in [0, E) while the gates are NaN. The rounds are a rolled loop, so k up to 1024
    does not unroll into the kernel."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.arange(0, BLOCK_E)
    kcol = tl.arange(0, BLOCK_K)
    in_row = row < T
    valid = col[None, :] < E

    x = tl.load(logits_ptr + row[:, None] * E + col[None, :], mask=in_row[:, None] & valid, other=0.0)
    inv_t = tl.cast(inv_t_hi, COMPUTE) + tl.cast(inv_t_lo, COMPUTE)
    p = softmax_rows(x.to(COMPUTE), col, E, inv_t)  # 0 in padded columns

    idx, gates = topk_select(p, col, kcol, E, BLOCK_E, TOP_K)

    out = row[:, None] * TOP_K + kcol[None, :]
    mask = in_row[:, None] & (kcol[None, :] < TOP_K)
    tl.store(gates_ptr + out, gates.to(gates_ptr.dtype.element_ty), mask=mask)
    tl.store(indices_ptr + out, idx.to(tl.int64), mask=mask)


@triton.jit
def _router_topk_bwd_kernel(
    logits_ptr, indices_ptr, dgates_ptr, dlogits_ptr, T, inv_t_hi, inv_t_lo,
    E: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, COMPUTE: tl.constexpr,
):
    """dlogits [T, E] from dgates [T, TOP_K], the forward's indices and the logits.

    With S the sum of the kept probabilities and g = p / S: dp_i = (dg_i - sum_j dg_j g_j) / S
    for kept i (0 otherwise), dlogits = p * (dp - sum_e p_e dp_e) / temperature."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.arange(0, BLOCK_E)
    in_row = row < T
    valid = col[None, :] < E

    x = tl.load(logits_ptr + row[:, None] * E + col[None, :], mask=in_row[:, None] & valid, other=0.0)
    inv_t = tl.cast(inv_t_hi, COMPUTE) + tl.cast(inv_t_lo, COMPUTE)
    p = softmax_rows(x.to(COMPUTE), col, E, inv_t)

    # Scatter the k gate gradients onto their experts' columns.
    kept = tl.zeros((BLOCK_T, BLOCK_E), dtype=COMPUTE)
    dg = tl.zeros((BLOCK_T, BLOCK_E), dtype=COMPUTE)
    for j in range(TOP_K):
        e = tl.load(indices_ptr + row * TOP_K + j, mask=in_row, other=-1)
        d = tl.load(dgates_ptr + row * TOP_K + j, mask=in_row, other=0.0).to(COMPUTE)
        hit = col[None, :] == e[:, None]
        kept = tl.where(hit, 1.0, kept)
        dg = tl.where(hit, d[:, None], dg)
    dx = topk_backward(p, kept, dg, inv_t)

    tl.store(dlogits_ptr + row[:, None] * E + col[None, :], dx.to(dlogits_ptr.dtype.element_ty),
             mask=in_row[:, None] & valid)


# -- launchers --------------------------------------------------------------------------------


def _empty(*shape, device, dtype) -> Tensor:
    """Every output the launchers allocate comes from here (tests poison it to catch
    unwritten elements)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _check_logits(logits) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have 2 dimensions [T, E], got shape {tuple(logits.shape)}")
    E = logits.shape[1]
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"logits must have between 1 and {MAX_EXPERTS} experts (columns), got {E}")
    return logits.contiguous()


def _check_top_k(top_k, num_experts: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, {num_experts}] (the number of experts), got {top_k!r}")
    return top_k


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        0 < temperature < math.inf
    ):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return float(temperature)


def _check_out(name: str, out: Optional[Tensor], shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if out is None:
        return
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor of shape {shape} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
            + ("" if out.is_contiguous() else " (not contiguous)")
        )


def _split_inverse(temperature: float) -> tuple[float, float]:
    """1/temperature as hi + lo, both exactly representable in fp32 (Triton passes Python
    floats as fp32 scalars): ~48 bits together, enough for the fp64 path."""
    inv = 1.0 / temperature
    hi = struct.unpack("f", struct.pack("f", inv))[0]
    lo = struct.unpack("f", struct.pack("f", inv - hi))[0]
    return hi, lo


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch_config(num_experts: int, target: str = "sm90") -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps, num_stages) from the launch table."""
    block_e = max(_MIN_BLOCK_E, triton.next_power_of_2(num_experts))
    block_t, _, num_warps, num_stages = _launch.config("router_topk", target, "any", block_e)
    return block_t, block_e, num_warps, num_stages


def router_topk_forward(
    logits: Tensor,
    top_k: int,
    temperature: float = 1.0,
    *,
    out_gates: Optional[Tensor] = None,
    out_indices: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(gates [T, k] in logits' dtype, indices [T, k] int64) for logits [T, E].

    out_gates / out_indices: optional preallocated contiguous outputs to write into."""
    logits = _check_logits(logits)
    T, E = logits.shape
    top_k = _check_top_k(top_k, E)
    temperature = _check_temperature(temperature)
    _check_out("out_gates", out_gates, (T, top_k), logits.dtype, logits.device)
    _check_out("out_indices", out_indices, (T, top_k), torch.int64, logits.device)
    gates = out_gates if out_gates is not None else _empty(T, top_k, device=logits.device, dtype=logits.dtype)
    indices = out_indices if out_indices is not None else _empty(T, top_k, device=logits.device, dtype=torch.int64)
    if T == 0:
        return gates, indices
    block_t, block_e, num_warps, num_stages = _launch_config(E, _launch.target_of(logits.device))
    hi, lo = _split_inverse(temperature)
    _launch.launch(
        _router_topk_fwd_kernel, (triton.cdiv(T, block_t),), (logits, gates, indices, T, hi, lo),
        dict(E=E, TOP_K=top_k, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
             COMPUTE=_compute_dtype(logits.dtype)),
        num_warps, num_stages, bytes=_nbytes(logits, gates, indices), note="router top-k",
    )
    return gates, indices


def router_topk_backward(
    logits: Tensor,
    indices: Tensor,
    dgates: Tensor,
    temperature: float = 1.0,
    *,
    out_dlogits: Optional[Tensor] = None,
) -> Tensor:
    """dlogits [T, E] (logits' dtype) from the gates' gradient dgates [T, k] and the forward's
    indices [T, k]. The probabilities are recomputed from the logits.

    out_dlogits: an optional preallocated contiguous output to write into."""
    logits = _check_logits(logits)
    T, E = logits.shape
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be an int64 tensor (router_topk_forward's indices), got dtype {indices.dtype}")
    if indices.dim() != 2 or indices.shape[0] != T:
        raise ValueError(f"indices must have shape ({T}, k) (T of logits, top_k), got {tuple(indices.shape)}")
    top_k = _check_top_k(indices.shape[1], E)
    if not isinstance(dgates, Tensor):
        raise TypeError(f"dgates must be a torch.Tensor, got {type(dgates).__name__}")
    if not dgates.is_floating_point():
        raise TypeError(f"dgates must be a floating-point tensor, got dtype {dgates.dtype}")
    if tuple(dgates.shape) != (T, top_k):
        raise ValueError(f"dgates must have shape {(T, top_k)} (like the gates), got {tuple(dgates.shape)}")
    for name, t in (("indices", indices), ("dgates", dgates)):
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}")
    temperature = _check_temperature(temperature)
    _check_out("out_dlogits", out_dlogits, (T, E), logits.dtype, logits.device)
    dlogits = out_dlogits if out_dlogits is not None else _empty(T, E, device=logits.device, dtype=logits.dtype)
    if T == 0:
        return dlogits
    block_t, block_e, num_warps, num_stages = _launch_config(E, _launch.target_of(logits.device))
    hi, lo = _split_inverse(temperature)
    indices, dgates = indices.contiguous(), dgates.contiguous()
    _launch.launch(
        _router_topk_bwd_kernel, (triton.cdiv(T, block_t),), (logits, indices, dgates, dlogits, T, hi, lo),
        dict(E=E, TOP_K=top_k, BLOCK_T=block_t, BLOCK_E=block_e, COMPUTE=_compute_dtype(logits.dtype)),
        num_warps, num_stages, bytes=_nbytes(logits, indices, dgates, dlogits), note="router top-k backward",
    )
    return dlogits


# -- autograd ---------------------------------------------------------------------------------


class RouterTopK(torch.autograd.Function):
    """(gates, indices) = router top-k of logits; gradients flow to the logits only."""

    @staticmethod
    def forward(ctx, logits: Tensor, top_k: int, temperature: float):
        gates, indices = router_topk_forward(logits, top_k, temperature)
        ctx.save_for_backward(logits, indices)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(indices)
        return gates, indices

    @staticmethod
    def backward(ctx, dgates: Tensor, dindices: Optional[Tensor]):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        logits, indices = ctx.saved_tensors
        return router_topk_backward(logits, indices, dgates, ctx.temperature), None, None


def router_topk(logits: Tensor, top_k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """softmax(logits / temperature) -> top k -> renormalised; (gates [T, k], indices [T, k]).

    Same contract as ``proper_kernels.reference.router_topk`` for 2-D logits."""
    return RouterTopK.apply(logits, top_k, temperature)
