"""Grouped strategy for many experts: (token, slot) pairs sorted by expert, ScatterMoE-style.

When E*r is too wide for one tile, each token's k chosen experts become k (token, slot)
pairs; the pairs are sorted by expert once per call (``Schedule``) and every kernel works
on blocks of pairs of one expert, gathering token rows by index (no padded copy). The
schedule is computed on the device without a host sync and reused by the backward.

Kernels (routing, the user LoRA and the router backward come from triton_linear):
  _shrink        h = x[tok] A_e^T per pair, and g * h
  _expand        y32[tok] += s_g (g * h) B_e^T        (atomic adds over the k slots)
  _bwd_dh        d(g*h) = s_g dy[tok] B_e, d gate per pair, dh = g * d(g*h)
  _bwd_dx        dx32[tok] += dh A_e                 (atomic adds over the k slots)
  _segment_gemm  per expert: sum over its pairs of L^T R (weight gradients of A and B)

Up to ``WIDE_SHRINK_PER_SLOT * k`` expert columns the shrink itself is dense
(triton_linear._shrink_wide: every expert's h for a tile of tokens, E/k times the FLOPs but
x read once instead of gathered k times, which is cheaper on an H100 while E*r is below
about 300 k); the pair-wise kernels then read h and g*h from that [T, E*r] layout.

Up to ``WIDE_MAX_COLUMNS`` expert columns (E*r) the shrink and the d(g*h) kernel also write
g*h and dh into a dense [T, E*r] layout (zero where a token did not pick the expert), and
triton_linear's dense expand and dx take it from there: no atomics and no fp32 staging of
[T, out] or [T, in], in base_out's own memory, at the price of E/k times the (small) FLOPs
of the two expand products. Past it the atomic kernels above run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# Widest E*r for which the expand and dx read a dense [T, E*r] layout instead of atomics.
WIDE_MAX_COLUMNS = 2048
# The shrink is dense too while E*r <= this times k (FLOPs vs the bytes of k gathers of x).
WIDE_SHRINK_PER_SLOT = 256


@dataclass
class Schedule:
    """Pairs sorted by expert and the blocks that cover them.

    order [P]: pair ids (t * k + slot) sorted by expert (stable); seg [E + 1]: where each
    expert's pairs start in `order`; block_expert / block_start [NB]: the expert and first
    sorted position of each block of BLOCK_P pairs (expert E marks a spare block)."""

    order: Tensor
    seg: Tensor
    block_expert: Tensor
    block_start: Tensor
    block_p: int

    def pack(self) -> Tensor:
        return torch.cat([self.order, self.seg, self.block_expert, self.block_start])

    @staticmethod
    def unpack(meta: Tensor, num_pairs: int, num_experts: int, block_p: int) -> "Schedule":
        nb = num_blocks(num_pairs, num_experts, block_p)
        o, s = num_pairs, num_pairs + num_experts + 1
        return Schedule(meta[:o], meta[o:s], meta[s : s + nb], meta[s + nb : s + 2 * nb], block_p)


def num_blocks(num_pairs: int, num_experts: int, block_p: int) -> int:
    """An upper bound on the blocks needed, known without looking at the routing."""
    return triton.cdiv(num_pairs, block_p) + num_experts


def make_schedule(idx: Tensor, num_experts: int, block_p: int) -> Schedule:
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    # scatter_add, not bincount: bincount reads the largest index back to the host (a sync).
    counts = torch.zeros(num_experts, dtype=torch.long, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    seg = torch.zeros(num_experts + 1, dtype=torch.long, device=idx.device)
    seg[1:] = torch.cumsum(counts, 0)
    blocks = (counts + block_p - 1) // block_p
    block_end = torch.cumsum(blocks, 0)  # blocks of experts 0..e end here
    b = torch.arange(num_blocks(flat.numel(), num_experts, block_p), device=idx.device)
    expert = torch.searchsorted(block_end, b, right=True)  # == num_experts for spare blocks
    e = expert.clamp(max=num_experts - 1)
    first_block = block_end[e] - blocks[e]
    start = seg[e] + (b - first_block) * block_p
    return Schedule(order, seg, expert, start, block_p)


@triton.jit
def _block(block_expert_ptr, block_start_ptr, seg_ptr, order_ptr, E: tl.constexpr, TOP_K: tl.constexpr,
           BLOCK_P: tl.constexpr):
    """(expert, sorted positions, their mask, pair ids, token ids) of this program's block."""
    b = tl.program_id(0)
    e = tl.load(block_expert_ptr + b)
    ec = tl.minimum(e, E - 1)
    start = tl.load(block_start_ptr + b)
    end = tl.load(seg_ptr + ec + 1)
    rows = start + tl.arange(0, BLOCK_P)
    # Both sides block comparisons, so the mask is an int1 block: a scalar condition (e < E)
    # &-ed onto a block is splatted to an integer tensor by the Triton interpreter, which
    # Triton 3.9 refuses as a mask. Compiled, this is the same code as the scalar form.
    rmask = (rows < end) & (tl.broadcast_to(e, rows.shape) < E)
    pair = tl.load(order_ptr + rows, mask=rmask, other=0)
    return e, ec, rows, rmask, pair, pair // TOP_K


@triton.jit
def _shrink(
    x_ptr, a_ptr, gate_ptr, order_ptr, seg_ptr, block_expert_ptr, block_start_ptr, h_ptr, hg_ptr, wide_ptr,
    IN: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, TOP_K: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """WIDE: g*h also goes to the token's row of wide [T, E*r] (expert e's columns), for a
    dense expand without atomics."""
    e, ec, rows, rmask, pair, tok = _block(block_expert_ptr, block_start_ptr, seg_ptr, order_ptr, E, TOP_K, BLOCK_P)
    if e < E:
        j = tl.arange(0, RP)
        h = tl.zeros((BLOCK_P, RP), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < IN
            x = tl.load(x_ptr + tok[:, None].to(tl.int64) * IN + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            a = tl.load(a_ptr + ec * (R * IN) + j[None, :] * IN + k[:, None], mask=(j < R)[None, :] & kmask[:, None], other=0.0)
            h = tl.dot(x.to(DT), a.to(DT), h, input_precision=PREC)
        gate = tl.load(gate_ptr + pair, mask=rmask, other=0.0)
        m = rmask[:, None] & (j < R)[None, :]
        tl.store(h_ptr + rows[:, None] * R + j[None, :], h, mask=m)
        tl.store(hg_ptr + rows[:, None] * R + j[None, :], (h * gate[:, None]).to(hg_ptr.dtype.element_ty), mask=m)
        if WIDE:
            tl.store(wide_ptr + tok[:, None].to(tl.int64) * (E * R) + ec * R + j[None, :],
                     (h * gate[:, None]).to(wide_ptr.dtype.element_ty), mask=m)


@triton.jit
def _expand(
    hg_ptr, b_ptr, order_ptr, seg_ptr, block_expert_ptr, block_start_ptr, y32_ptr, scaling,
    OUT: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    e, ec, rows, rmask, pair, tok = _block(block_expert_ptr, block_start_ptr, seg_ptr, order_ptr, E, TOP_K, BLOCK_P)
    if e < E:
        o = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        omask = o < OUT
        j = tl.arange(0, RP)
        hg = tl.load(hg_ptr + rows[:, None] * R + j[None, :], mask=rmask[:, None] & (j < R)[None, :], other=0.0)
        b = tl.load(b_ptr + ec * (OUT * R) + o[None, :] * R + j[:, None], mask=(j < R)[:, None] & omask[None, :], other=0.0)
        acc = tl.dot(hg.to(DT), b.to(DT), input_precision=PREC) * scaling
        tl.atomic_add(y32_ptr + tok[:, None].to(tl.int64) * OUT + o[None, :], acc, mask=rmask[:, None] & omask[None, :])


@triton.jit
def _bwd_dh(
    dy_ptr, b_ptr, h_ptr, gate_ptr, order_ptr, seg_ptr, block_expert_ptr, block_start_ptr, dh_ptr, dslot_ptr, wide_ptr,
    scaling,
    OUT: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, TOP_K: tl.constexpr, CW: tl.constexpr,
    WIDE: tl.constexpr, H_WIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr,
    PREC: tl.constexpr,
):
    """WIDE: dh also goes to the token's row of wide [T, CW] (expert e's columns), for a
    dense dx without atomics. H_WIDE: h is the wide shrink's dense [T, E*r]."""
    e, ec, rows, rmask, pair, tok = _block(block_expert_ptr, block_start_ptr, seg_ptr, order_ptr, E, TOP_K, BLOCK_P)
    if e < E:
        j = tl.arange(0, RP)
        dhg = tl.zeros((BLOCK_P, RP), dtype=tl.float32)
        for n0 in range(0, OUT, BLOCK_N):
            o = n0 + tl.arange(0, BLOCK_N)
            omask = o < OUT
            dy = tl.load(dy_ptr + tok[:, None].to(tl.int64) * OUT + o[None, :], mask=rmask[:, None] & omask[None, :], other=0.0)
            b = tl.load(b_ptr + ec * (OUT * R) + o[:, None] * R + j[None, :], mask=omask[:, None] & (j < R)[None, :], other=0.0)
            dhg = tl.dot(dy.to(DT), b.to(DT), dhg, input_precision=PREC)
        dhg = dhg * scaling
        m = rmask[:, None] & (j < R)[None, :]
        if H_WIDE:
            h = tl.load(h_ptr + tok[:, None].to(tl.int64) * (E * R) + ec * R + j[None, :], mask=m, other=0.0)
        else:
            h = tl.load(h_ptr + rows[:, None] * R + j[None, :], mask=m, other=0.0)
        gate = tl.load(gate_ptr + pair, mask=rmask, other=0.0)
        tl.store(dslot_ptr + pair, tl.sum(dhg * h, axis=1), mask=rmask)
        tl.store(dh_ptr + rows[:, None] * R + j[None, :], dhg * gate[:, None], mask=m)
        if WIDE:
            tl.store(wide_ptr + tok[:, None].to(tl.int64) * CW + ec * R + j[None, :],
                     (dhg * gate[:, None]).to(wide_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_dx(
    dh_ptr, a_ptr, order_ptr, seg_ptr, block_expert_ptr, block_start_ptr, dx32_ptr,
    IN: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    e, ec, rows, rmask, pair, tok = _block(block_expert_ptr, block_start_ptr, seg_ptr, order_ptr, E, TOP_K, BLOCK_P)
    if e < E:
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = k < IN
        j = tl.arange(0, RP)
        dh = tl.load(dh_ptr + rows[:, None] * R + j[None, :], mask=rmask[:, None] & (j < R)[None, :], other=0.0)
        a = tl.load(a_ptr + ec * (R * IN) + j[:, None] * IN + k[None, :], mask=(j < R)[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(dh.to(DT), a.to(DT), input_precision=PREC)
        tl.atomic_add(dx32_ptr + tok[:, None].to(tl.int64) * IN + k[None, :], acc, mask=rmask[:, None] & kmask[None, :])


@triton.jit
def _segment_gemm(
    l_ptr, r_ptr, order_ptr, seg_ptr, out_ptr, scale,
    M: tl.constexpr, N: tl.constexpr, L_BY_TOKEN: tl.constexpr, R_BY_TOKEN: tl.constexpr, L_WIDE: tl.constexpr,
    R_WIDE: tl.constexpr, L_STRIDE: tl.constexpr, R_STRIDE: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr,
    PREC: tl.constexpr,
):
    """out[e] = scale * sum over the pairs of expert e of L[row]^T R[row]: [E, M, N].

    A row of L or R is the pair's token (x, dy: [T, *]) when *_BY_TOKEN, else its sorted
    position (h, dh: [P, *]). *_WIDE: the operand is a dense layout with one row per token
    (row stride *_STRIDE; g*h of the dense shrink, dh of the dense d(g*h)), read at the
    pair's token, expert e's columns."""
    e = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = m < M
    nmask = n < N
    start = tl.load(seg_ptr + e)
    end = tl.load(seg_ptr + e + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        rmask = rows < end
        tok = (tl.load(order_ptr + rows, mask=rmask, other=0) // TOP_K).to(tl.int64)
        if L_BY_TOKEN:
            lrow = tok
        else:
            lrow = rows
        if R_BY_TOKEN:
            rrow = tok
        else:
            rrow = rows
        if L_WIDE:
            lptr = l_ptr + tok[:, None] * L_STRIDE + e * M + m[None, :]
        else:
            lptr = l_ptr + lrow[:, None] * M + m[None, :]
        left = tl.load(lptr, mask=rmask[:, None] & mmask[None, :], other=0.0)
        if R_WIDE:
            rptr = r_ptr + tok[:, None] * R_STRIDE + e * N + n[None, :]
        else:
            rptr = r_ptr + rrow[:, None] * N + n[None, :]
        right = tl.load(rptr, mask=rmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(tl.trans(left.to(DT)), right.to(DT), acc, input_precision=PREC)
    tl.store(out_ptr + e.to(tl.int64) * (M * N) + m[:, None] * N + n[None, :], (acc * scale).to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
