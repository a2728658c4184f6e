"""Grouped strategy for many experts: (token, slot) pairs sorted by expert, ScatterMoE-style.

When E*r is too wide for one tile, each token's k chosen experts become k (token, slot)
pairs; the pairs are sorted by expert once per call (``Schedule``) and every kernel works
on blocks of pairs of one expert, gathering token rows by index (no padded copy). The
schedule is computed on the device without a host sync and reused by the backward. The
routing, the user LoRA, the router backward and the final sums into y and dx run in the
token-order kernels (``triton_dense``, ``triton_dense_bwd``); the op (``triton_linear``)
strings them together.

Kernels, each with a launcher of the same name without the underscore:
  _shrink        h = x[tok] A_e^T per pair, and g * h
  _expand        y32[tok] += s_g (g * h) B_e^T        (atomic adds over the k slots)
  _bwd_dh        d(g*h) = s_g dy[tok] B_e, d gate per pair, dh = g * d(g*h)
  _bwd_dx        dx32[tok] += dh A_e                 (atomic adds over the k slots)
  _segment_gemm  per expert: sum over its pairs of L^T R (weight gradients of A and B)
  _shrink_wide   every expert's h for a tile of tokens (the dense shrink below)
  _bwd_dh_wide   every expert's d(g*h) for a tile of tokens (its backward)

Up to ``WIDE_SHRINK_PER_SLOT * k`` expert columns the shrink itself is dense (every
expert's h for a tile of tokens, E/k times the FLOPs but x read once instead of gathered k
times, which is cheaper on an H100 while E*r is below about 300 k); the pair-wise kernels
then read h and g*h from that [T, E*r] layout.

Up to ``WIDE_MAX_COLUMNS`` expert columns (E*r) the shrink and the d(g*h) kernel also write
g*h and dh into a dense [T, E*r] layout (zero where a token did not pick the expert), and
the token-order expand and dx take it from there: no atomics and no fp32 staging of
[T, out] or [T, in], in base_out's own memory, at the price of E/k times the (small) FLOPs
of the two expand products. Past it the atomic kernels above run.

x and dy are read through their strides; the weights and side buffers are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch as _launch
from .triton_blocks import at, gate_columns, nbytes, pow2
from .triton_utils import slot

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
    sx_t, sx_k, IN: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, TOP_K: tl.constexpr,
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
            x = tl.load(x_ptr + at(tok.to(tl.int64), k, sx_t, sx_k), mask=rmask[:, None] & kmask[None, :], other=0.0)
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
    scaling, sdy_t, sdy_o,
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
            dy = tl.load(dy_ptr + at(tok.to(tl.int64), o, sdy_t, sdy_o), mask=rmask[:, None] & omask[None, :], other=0.0)
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
    l_ptr, r_ptr, order_ptr, seg_ptr, out_ptr, scale, sl_r, sl_c, sr_r, sr_c,
    M: tl.constexpr, N: tl.constexpr, L_BY_TOKEN: tl.constexpr, R_BY_TOKEN: tl.constexpr, L_WIDE: tl.constexpr,
    R_WIDE: tl.constexpr, TOP_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr,
):
    """out[e] = scale * sum over the pairs of expert e of L[row]^T R[row]: [E, M, N].

    A row of L or R is the pair's token (x, dy: [T, *]) when *_BY_TOKEN, else its sorted
    position (h, dh: [P, *]). *_WIDE: the operand is a dense layout with one row per token
    (g*h of the dense shrink, dh of the dense d(g*h)), read at the pair's token, expert e's
    columns. Each operand is read through its strides (s*_r rows, s*_c columns)."""
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
        if L_WIDE:
            lptr = l_ptr + at(tok, e * M + m, sl_r, sl_c)
        elif L_BY_TOKEN:
            lptr = l_ptr + at(tok, m, sl_r, sl_c)
        else:
            lptr = l_ptr + at(rows, m, sl_r, sl_c)
        left = tl.load(lptr, mask=rmask[:, None] & mmask[None, :], other=0.0)
        if R_WIDE:
            rptr = r_ptr + at(tok, e * N + n, sr_r, sr_c)
        elif R_BY_TOKEN:
            rptr = r_ptr + at(tok, n, sr_r, sr_c)
        else:
            rptr = r_ptr + at(rows, n, sr_r, sr_c)
        right = tl.load(rptr, mask=rmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(tl.trans(left.to(DT)), right.to(DT), acc, input_precision=PREC)
    tl.store(out_ptr + e.to(tl.int64) * (M * N) + m[:, None] * N + n[None, :], (acc * scale).to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _shrink_wide(
    xl_ptr, a_ptr, gate_ptr, idx_ptr, h_ptr, hg_ptr, T, sx_t, sx_k,
    IN: tl.constexpr, E: tl.constexpr, R: tl.constexpr, TOP_K: tl.constexpr, KP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Dense shrink: every expert's h for a tile of tokens and a chunk of the E*r expert
    columns (x read once per chunk, no gather), gated by the routing: h and g*h [T, E*r]
    (zero where the token did not pick the expert)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    tok = t.to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < E * R
    kcol = tl.arange(0, KP)
    h = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < IN
        x = tl.load(xl_ptr + at(tok, k, sx_t, sx_k), mask=tmask[:, None] & kmask[None, :], other=0.0)
        a = tl.load(a_ptr + c[None, :] * IN + k[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
        h = tl.dot(x.to(DT), a.to(DT), h, input_precision=PREC)
    tk = tmask[:, None] & (kcol < TOP_K)[None, :]
    idx = tl.load(idx_ptr + tok[:, None] * TOP_K + kcol[None, :], mask=tk, other=-1).to(tl.int32)
    gates = tl.load(gate_ptr + tok[:, None] * TOP_K + kcol[None, :], mask=tk, other=0.0)
    gc = gate_columns(idx, gates, kcol, c, BLOCK_T, BLOCK_C, R, E * R, TOP_K)
    tc = tmask[:, None] & cmask[None, :]
    tl.store(h_ptr + tok[:, None] * (E * R) + c[None, :], h, mask=tc)
    tl.store(hg_ptr + tok[:, None] * (E * R) + c[None, :], (h * gc).to(hg_ptr.dtype.element_ty), mask=tc)


@triton.jit
def _bwd_dh_wide(
    dy_ptr, b_ptr, h_ptr, gate_ptr, idx_ptr, dslot_ptr, dcat_ptr, T, scaling, sdy_t, sdy_o,
    OUT: tl.constexpr, E: tl.constexpr, R: tl.constexpr, TOP_K: tl.constexpr, KP: tl.constexpr, CW: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Dense d(g*h) = s_g dy B_all for a tile of tokens and a chunk of whole experts' columns
    (dy read once per chunk, no gather): d gate of each (token, slot) whose expert lies in
    the chunk into dslot [T, k], and dh = g d(g*h) into dcat's first E*r columns (zero
    where the token did not pick the expert)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    tok = t.to(tl.int64)
    c0 = tl.program_id(1) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    cmask = c < E * R
    kcol = tl.arange(0, KP)
    boff = (c // R) * (OUT * R) + (c % R)
    dhg = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for n0 in range(0, OUT, BLOCK_N):
        o = n0 + tl.arange(0, BLOCK_N)
        omask = o < OUT
        dy = tl.load(dy_ptr + at(tok, o, sdy_t, sdy_o), mask=tmask[:, None] & omask[None, :], other=0.0)
        b = tl.load(b_ptr + boff[None, :] + o[:, None] * R, mask=omask[:, None] & cmask[None, :], other=0.0)
        dhg = tl.dot(dy.to(DT), b.to(DT), dhg, input_precision=PREC)
    dhg = dhg * scaling
    tc = tmask[:, None] & cmask[None, :]
    h = tl.load(h_ptr + tok[:, None] * (E * R) + c[None, :], mask=tc, other=0.0)
    prod = dhg * h
    tk = tmask[:, None] & (kcol < TOP_K)[None, :]
    idx = tl.load(idx_ptr + tok[:, None] * TOP_K + kcol[None, :], mask=tk, other=-1).to(tl.int32)
    gates = tl.load(gate_ptr + tok[:, None] * TOP_K + kcol[None, :], mask=tk, other=0.0)
    for s in range(TOP_K):
        sel = slot(idx, kcol, s)
        here = (sel * R >= c0) & (sel * R < c0 + BLOCK_C)  # the slot's expert is in this chunk
        d = tl.sum(tl.where((c // R)[None, :] == sel[:, None], prod, 0.0), axis=1)
        tl.store(dslot_ptr + tok * TOP_K + s, d, mask=tmask & here)
    gc = gate_columns(idx, gates, kcol, c, BLOCK_T, BLOCK_C, R, E * R, TOP_K)
    tl.store(dcat_ptr + tok[:, None] * CW + c[None, :], (dhg * gc).to(dcat_ptr.dtype.element_ty), mask=tc)


# -- launchers ------------------------------------------------------------------------------
#
# `s` is the call (``triton_call.Call``: sizes, dtypes and the launch configurations it
# read from ``proper_kernels.launch``); `sched` the call's Schedule.


def _pairs(s, sched) -> tuple:
    """(blocks of pairs, the schedule's pointers, the pair kernels' configuration)."""
    args = (sched.order, sched.seg, sched.block_expert, sched.block_start)
    return sched.block_expert.numel(), args, s.grouped


def _consts(s) -> dict:
    return dict(E=s.E, R=s.R, RP=s.RP, TOP_K=s.TOP_K, BLOCK_P=s.BLOCK_P, DT=s.DT, PREC=s.PREC)


def shrink_wide(s, xl2, lora_A, gates, idx, h, hg) -> None:
    """h and g*h [T, E*r] for every expert (the dense shrink)."""
    bt, bk, warps, stages = s.shrink_wide
    _launch.launch(_shrink_wide, (triton.cdiv(s.T, bt), triton.cdiv(s.ER, s.BLOCK_CW)),
                   (xl2, lora_A, gates, idx, h, hg, s.T, *xl2.stride()),
                   dict(IN=s.IN, E=s.E, R=s.R, TOP_K=s.TOP_K, KP=s.KP, BLOCK_T=bt, BLOCK_K=bk, BLOCK_C=s.BLOCK_CW,
                        DT=s.DT, PREC=s.PREC), warps, stages,
                   bytes=nbytes(xl2, lora_A, h, hg, gates, idx), flops=2 * s.T * s.IN * s.ER,
                   note="grouped shrink, dense (every expert)")


def shrink(s, sched, xl2, lora_A, gates, h, hg, wide) -> None:
    """h and g*h [P, r] per sorted pair; with s.wide g*h also into `wide` [T, E*r] (which
    must hold zeros: the columns of the experts a token did not pick)."""
    nb, args, (_, bk, warps, stages) = _pairs(s, sched)
    _launch.launch(_shrink, (nb,), (xl2, lora_A, gates, *args, h, hg, wide, *xl2.stride()),
                   dict(IN=s.IN, BLOCK_K=bk, WIDE=s.wide, **_consts(s)), warps, stages,
                   bytes=s.TOP_K * nbytes(xl2) + nbytes(lora_A, h, hg) + (nbytes(wide) if s.wide else 0),
                   flops=2 * s.num_pairs() * s.IN * s.R, note="grouped shrink")


def expand(s, sched, hg, lora_B, extra, scaling) -> None:
    """extra [T, out] fp32 (zeros on entry) += s_g (g*h) B_e^T per pair, by atomic adds."""
    nb, args, (_, bk, warps, stages) = _pairs(s, sched)
    _launch.launch(_expand, (nb, triton.cdiv(s.OUT, bk)), (hg, lora_B, *args, extra, scaling),
                   dict(OUT=s.OUT, BLOCK_N=bk, **_consts(s)), warps, stages,
                   bytes=nbytes(hg, lora_B) + 2 * s.TOP_K * nbytes(extra), flops=2 * s.num_pairs() * s.OUT * s.R,
                   note="grouped expand (fp32 atomics)")


def bwd_dh_wide(s, dy2, lora_B, h, gates, idx, dslot, dcat, scaling) -> None:
    """d gate per (token, slot) into dslot and dh into dcat's first E*r columns, for every
    expert (the dense d(g*h))."""
    bt, bn, warps, stages = s.bwd_dh_wide
    _launch.launch(_bwd_dh_wide, (triton.cdiv(s.T, bt), triton.cdiv(s.ER, s.BLOCK_CW)),
                   (dy2, lora_B, h, gates, idx, dslot, dcat, s.T, scaling, *dy2.stride()),
                   dict(OUT=s.OUT, E=s.E, R=s.R, TOP_K=s.TOP_K, KP=s.KP, CW=s.CW, BLOCK_T=bt, BLOCK_N=bn,
                        BLOCK_C=s.BLOCK_CW, DT=s.DT, PREC=s.PREC), warps, stages,
                   bytes=nbytes(dy2, lora_B, h, gates, idx, dslot) + s.T * s.ER * dcat.element_size(),
                   flops=2 * s.T * s.OUT * s.ER, note="grouped d(g h), dense (every expert)")


def bwd_dh(s, sched, dy2, lora_B, h, gates, dh, dslot, wide, scaling) -> None:
    """d gate per pair into dslot and dh [P, r]; with s.wide dh also into `wide` (dcat,
    zeros where a token did not pick the expert). h is [T, E*r] when s.wide_shrink."""
    nb, args, (_, bk, warps, stages) = _pairs(s, sched)
    _launch.launch(_bwd_dh, (nb,), (dy2, lora_B, h, gates, *args, dh, dslot, wide, scaling, *dy2.stride()),
                   dict(OUT=s.OUT, BLOCK_N=bk, CW=s.CW, WIDE=s.wide, H_WIDE=s.wide_shrink, **_consts(s)),
                   warps, stages,
                   bytes=s.TOP_K * nbytes(dy2) + nbytes(lora_B, h, dh, dslot), flops=2 * s.num_pairs() * s.OUT * s.R,
                   note="grouped d(g h)")


def bwd_dx(s, sched, dh, lora_A, extra) -> None:
    """extra [T, in] fp32 (zeros on entry) += dh A_e per pair, by atomic adds."""
    nb, args, (_, bk, warps, stages) = _pairs(s, sched)
    _launch.launch(_bwd_dx, (nb, triton.cdiv(s.IN, bk)), (dh, lora_A, *args, extra),
                   dict(IN=s.IN, BLOCK_K=bk, **_consts(s)), warps, stages,
                   bytes=nbytes(dh, lora_A) + 2 * s.TOP_K * nbytes(extra),
                   flops=2 * s.num_pairs() * s.IN * s.R, note="grouped dx (fp32 atomics)")


def segment_gemm(s, sched, left, right, out, M, N, left_by_token, right_by_token, scale, left_wide=False,
                 right_wide=False) -> Tensor:
    """out [E, M, N] = per expert, over its (token, slot) pairs, scale * L^T R. *_wide: the
    operand is a dense [T, E*r + ...] layout."""
    cap_m, cap_n, warps, stages = s.segment
    bm, bn = min(pow2(M), cap_m), min(pow2(N), cap_n)
    _launch.launch(
        _segment_gemm, (s.E, triton.cdiv(M, bm), triton.cdiv(N, bn)),
        (left, right, sched.order, sched.seg, out, scale, *left.stride(), *right.stride()),
        dict(M=M, N=N, L_BY_TOKEN=left_by_token, R_BY_TOKEN=right_by_token, L_WIDE=left_wide, R_WIDE=right_wide,
             TOP_K=s.TOP_K, BLOCK_P=s.BLOCK_P, BLOCK_M=bm, BLOCK_N=bn, DT=s.DT, PREC=s.PREC),
        warps, stages, bytes=nbytes(out, left, right), flops=2 * s.num_pairs() * M * N, note="grouped weight gradient",
    )
    return out
