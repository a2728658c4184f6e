"""The fused ProperLinear pass in Triton: router, top-k, gated expert LoRAs and user LoRA.

Every kernel works on blocks of tokens in the plan's sorted order (``proper_kernels.plan``):
a block holds the runs of a few users, and the user LoRA is one GEMM per run against that
user's rows, on tensor cores (no per-token gather of the bank, no 3-D broadcast tiles).
Dots take their operands in the input dtype (bf16/fp16) with fp32 accumulators; fp32 inputs
run in IEEE fp32, or TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set. Under the
Triton interpreter bf16 is upcast first (``DT``, a constexpr): the interpreter holds bf16 as
raw 16-bit words.

Dense-masked strategy (E*r up to 256 columns in one tile), forward:
  _shrink   per block of sorted tokens (and per split of the features, for few tokens):
            h = x_lora A_all^T [T, E*r], logits = x W_x^T, h_u = A^u x_lora per run;
            with one split it finishes the routing (R[u], W_h h_u, softmax, top-k) and
            stores h, g*h, h_u, logits, gates and indices; with several it stores partial
            sums and _route finishes.
  _route    sums the split-K partials, routes (decode: the shrink then covers every SM).
  _expand   per (block, out tile): y = base_out + s_g (g*h) B_all + s_u h_u B^u (per run),
            in base_out's dtype, into base_out's own memory when in place.
Backward:
  _bwd_dh   per block: d(g*h) = s_g dy B_all, dh_u = s_u dy B^u (per run), the router
            backward (d gates, from the products and from the gates' own gradient, to
            d logits), dh = g d(g*h), dh_u += d logits W_h.
  _bwd_dx   per (block, in tile): dx = dh A_all + d logits W_x + dh_u A^u (per run).
  _wgrad_in  per tile of x's features, streamed over the sorted tokens: lora_A's and
            router_x's gradients, and each user's user_A row when the user's run ends
            (rows of the users present, or compact rows for sparse gradients).
  _wgrad_out the same over dy: lora_B's, and each user's user_B row.
  So x and dy are each read once more for all the weight gradients; the user router's
  gradient is an index_add of d logits.
Nothing syncs with the host. Launch configurations come from ``proper_kernels.launch``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch as _launch
from . import triton_grouped
from .plan import ORDER, RUN, RUN_END, RUN_USER, UID, BatchPlan, build_plan, check_plan
from .reference import Routing
from .triton_utils import slot, softmax_rows, topk_backward, topk_select

# Largest E*r the dense strategy holds in one tile.
DENSE_MAX_COLUMNS = 256


def _empty(*shape, device, dtype) -> Tensor:
    """Every output and side buffer comes from here (tests poison it to catch unwritten
    elements)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _dot_dtype(dtype: torch.dtype):
    """The dtype dots take: the input's own, except bf16 under the interpreter."""
    if dtype == torch.bfloat16 and _launch.interpreting():
        return tl.float32
    return _TL[dtype]


def _precision(dtype: torch.dtype) -> str:
    """input_precision of fp32 dots (16-bit dots ignore it)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _launch.interpreting():
        return "tf32"
    return "ieee"


# -- device helpers ---------------------------------------------------------------------------


@triton.jit
def _runs(run_ptr, start, pos, pmask, T, BLOCK: tl.constexpr):
    """The run of each sorted position of a block, and the block's first and last run."""
    prun = tl.load(run_ptr + pos, mask=pmask, other=-1)
    r_first = tl.load(run_ptr + start)
    r_last = tl.load(run_ptr + tl.minimum(start + BLOCK, T) - 1)
    return prun, r_first, r_last


@triton.jit
def _block_tokens(order_ptr, run_ptr, T, BLOCK_T: tl.constexpr):
    """This program's block of sorted positions: (positions, mask, token ids, run of each
    position, first and last run in the block)."""
    start = tl.program_id(0) * BLOCK_T
    pos = start + tl.arange(0, BLOCK_T)
    pmask = pos < T
    tok = tl.load(order_ptr + pos, mask=pmask, other=0)
    prun, r_first, r_last = _runs(run_ptr, start, pos, pmask, T, BLOCK_T)
    return pos, pmask, tok, prun, r_first, r_last


@triton.jit
def _bank_row(run_user_ptr, rr, COMPACT: tl.constexpr):
    """(user of run rr, the gradient row it writes: the user's, or rr itself when COMPACT)."""
    u = tl.load(run_user_ptr + rr)
    if COMPACT:
        row = u * 0 + rr  # int64, also where the interpreter's rr is a Python int
    else:
        row = u
    return u, row


@triton.jit
def _dot_f32(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    """a @ b for an fp32 a and a b in the dot dtype DT, on tensor cores and nearly as exact as
    fp32: a is split into a DT high part and a DT remainder (two dots). Keeps the router's
    W_h terms in fp32 precision for 16-bit inputs."""
    if DT == tl.float32:
        return tl.dot(a, b, input_precision=PREC)
    hi = a.to(DT)
    lo = (a - hi.to(tl.float32)).to(DT)
    return tl.dot(hi, b, input_precision=PREC) + tl.dot(lo, b, input_precision=PREC)


@triton.jit
def _gate_columns(idx, gates, kcol, c, BLOCK_T: tl.constexpr, ERP: tl.constexpr, R: tl.constexpr,
                  ER: tl.constexpr, TOP_K: tl.constexpr):
    """[BT, ERP]: the gate of each expert column (column c belongs to expert c // R)."""
    gc = tl.zeros((BLOCK_T, ERP), dtype=tl.float32)
    expert = c // R
    for s in range(TOP_K):
        sel = slot(idx, kcol, s)
        g = slot(gates, kcol, s)
        gc = tl.where(expert[None, :] == sel[:, None], g[:, None], gc)
    return tl.where((c < ER)[None, :], gc, 0.0)


@triton.jit
def _finish_routing(
    h, logits, hu, tok, tmask, uid_ptr, r_ptr, wh_ptr,
    h_ptr, hg_ptr, hu_ptr, logit_ptr, gate_ptr, idx_ptr, default_row, inv_temperature,
    E: tl.constexpr, R: tl.constexpr, RU: tl.constexpr, TOP_K: tl.constexpr, EP: tl.constexpr,
    ERP: tl.constexpr, RUP: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_R: tl.constexpr, HAS_WH: tl.constexpr, HAS_U: tl.constexpr, SHRINK: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr,
):
    """Add the user and LoRA-aware router terms, route in fp32, store the side outputs (by
    token)."""
    col = tl.arange(0, EP)
    c = tl.arange(0, ERP)
    j = tl.arange(0, RUP)
    kcol = tl.arange(0, KP)
    uid = tl.load(uid_ptr + tok, mask=tmask, other=-1)
    has_row = tmask & (uid >= 0)
    if HAS_R:
        rrow = tl.where(has_row, uid, default_row)
        logits += tl.load(r_ptr + rrow[:, None] * E + col[None, :],
                          mask=tmask[:, None] & (col < E)[None, :], other=0.0).to(tl.float32)
    if HAS_WH:  # logits += h_u W_h^T
        wh = tl.load(wh_ptr + col[None, :] * RU + j[:, None], mask=(col < E)[None, :] & (j < RU)[:, None], other=0.0)
        logits += _dot_f32(hu, wh.to(DT), DT, PREC)
    p = softmax_rows(logits, col, E, inv_temperature)
    idx, gates = topk_select(p, col, kcol, E, EP, TOP_K)
    if SHRINK:
        gc = _gate_columns(idx, gates, kcol, c, BLOCK_T, ERP, R, E * R, TOP_K)
        tc = tmask[:, None] & (c < E * R)[None, :]
        tl.store(h_ptr + tok[:, None] * (E * R) + c[None, :], h, mask=tc)
        tl.store(hg_ptr + tok[:, None] * (E * R) + c[None, :], (h * gc).to(hg_ptr.dtype.element_ty), mask=tc)
    if HAS_U:
        tl.store(hu_ptr + tok[:, None] * RU + j[None, :], hu, mask=tmask[:, None] & (j < RU)[None, :])
    tl.store(logit_ptr + tok[:, None] * E + col[None, :], logits, mask=tmask[:, None] & (col < E)[None, :])
    tk = tmask[:, None] & (kcol < TOP_K)[None, :]
    tl.store(gate_ptr + tok[:, None] * TOP_K + kcol[None, :], gates, mask=tk)
    tl.store(idx_ptr + tok[:, None] * TOP_K + kcol[None, :], idx.to(tl.int64), mask=tk)


# -- forward ----------------------------------------------------------------------------------


@triton.jit
def _shrink(
    x_ptr, xl_ptr, order_ptr, run_ptr, run_user_ptr, uid_ptr, a_ptr, wx_ptr, ua_ptr, r_ptr, wh_ptr,
    h_ptr, hg_ptr, hu_ptr, logit_ptr, gate_ptr, idx_ptr,
    T, default_row, inv_temperature,
    IN: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RU: tl.constexpr, TOP_K: tl.constexpr,
    EP: tl.constexpr, ERP: tl.constexpr, RUP: tl.constexpr, KP: tl.constexpr,
    HAS_WX: tl.constexpr, HAS_R: tl.constexpr, HAS_WH: tl.constexpr, HAS_U: tl.constexpr,
    SAME_X: tl.constexpr, SHRINK: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """SHRINK=False (grouped strategy): route only, the experts' shrink runs elsewhere.
    SPLIT > 1: program (block, s) covers the s-th share of the features and stores partial
    sums h [SPLIT, T, E*r], logits [SPLIT, T, E], h_u [SPLIT, T, r_u] for _route."""
    sid = tl.program_id(1)
    pos, pmask, tok, prun, r_first, r_last = _block_tokens(order_ptr, run_ptr, T, BLOCK_T)
    col = tl.arange(0, EP)
    c = tl.arange(0, ERP)
    j = tl.arange(0, RUP)
    N_TILES: tl.constexpr = (IN + BLOCK_K - 1) // BLOCK_K
    k_lo = sid * N_TILES // SPLIT
    k_hi = (sid + 1) * N_TILES // SPLIT

    h = tl.zeros((BLOCK_T, ERP), dtype=tl.float32)
    logits = tl.zeros((BLOCK_T, EP), dtype=tl.float32)
    hu = tl.zeros((BLOCK_T, RUP), dtype=tl.float32)
    for kt in range(k_lo, k_hi):
        k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = k < IN
        xm = pmask[:, None] & kmask[None, :]
        xl = tl.load(xl_ptr + tok[:, None] * IN + k[None, :], mask=xm, other=0.0).to(DT)
        if SHRINK:
            a = tl.load(a_ptr + c[None, :] * IN + k[:, None], mask=(c < E * R)[None, :] & kmask[:, None], other=0.0)
            h = tl.dot(xl, a.to(DT), h, input_precision=PREC)
        if HAS_WX:
            if SAME_X:
                xr = xl
            else:
                xr = tl.load(x_ptr + tok[:, None] * IN + k[None, :], mask=xm, other=0.0).to(DT)
            w = tl.load(wx_ptr + col[None, :] * IN + k[:, None], mask=(col < E)[None, :] & kmask[:, None], other=0.0)
            logits = tl.dot(xr, w.to(DT), logits, input_precision=PREC)
        if HAS_U:
            for rr in range(r_first, r_last + 1):
                u = tl.load(run_user_ptr + rr)
                if u >= 0:
                    ua = tl.load(ua_ptr + u * (RU * IN) + j[None, :] * IN + k[:, None],
                                 mask=(j < RU)[None, :] & kmask[:, None], other=0.0)
                    part = tl.dot(xl, ua.to(DT), input_precision=PREC)
                    hu += tl.where((prun == rr)[:, None], part, 0.0)

    if SPLIT == 1:
        _finish_routing(h, logits, hu, tok, pmask, uid_ptr, r_ptr, wh_ptr, h_ptr, hg_ptr, hu_ptr, logit_ptr,
                        gate_ptr, idx_ptr, default_row, inv_temperature, E, R, RU, TOP_K, EP, ERP, RUP, KP,
                        BLOCK_T, HAS_R, HAS_WH, HAS_U, SHRINK, DT, PREC)
    else:
        row = sid.to(tl.int64) * T + tok
        if SHRINK:
            tl.store(h_ptr + row[:, None] * (E * R) + c[None, :], h, mask=pmask[:, None] & (c < E * R)[None, :])
        if HAS_WX:
            tl.store(logit_ptr + row[:, None] * E + col[None, :], logits, mask=pmask[:, None] & (col < E)[None, :])
        if HAS_U:
            tl.store(hu_ptr + row[:, None] * RU + j[None, :], hu, mask=pmask[:, None] & (j < RU)[None, :])


@triton.jit
def _shrink_wide(
    xl_ptr, a_ptr, gate_ptr, idx_ptr, h_ptr, hg_ptr, T,
    IN: tl.constexpr, E: tl.constexpr, R: tl.constexpr, TOP_K: tl.constexpr, KP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Grouped strategy, dense shrink: every expert's h for a tile of tokens and a chunk of
    the E*r expert columns (x read once per chunk, no gather), gated by the routing: h and
    g*h [T, E*r] (zero where the token did not pick the expert)."""
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
        x = tl.load(xl_ptr + tok[:, None] * IN + k[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0)
        a = tl.load(a_ptr + c[None, :] * IN + k[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
        h = tl.dot(x.to(DT), a.to(DT), h, input_precision=PREC)
    tk = tmask[:, None] & (kcol < TOP_K)[None, :]
    idx = tl.load(idx_ptr + tok[:, None] * TOP_K + kcol[None, :], mask=tk, other=-1).to(tl.int32)
    gates = tl.load(gate_ptr + tok[:, None] * TOP_K + kcol[None, :], mask=tk, other=0.0)
    gc = _gate_columns(idx, gates, kcol, c, BLOCK_T, BLOCK_C, R, E * R, TOP_K)
    tc = tmask[:, None] & cmask[None, :]
    tl.store(h_ptr + tok[:, None] * (E * R) + c[None, :], h, mask=tc)
    tl.store(hg_ptr + tok[:, None] * (E * R) + c[None, :], (h * gc).to(hg_ptr.dtype.element_ty), mask=tc)


@triton.jit
def _route(
    ph_ptr, plogit_ptr, phu_ptr, uid_ptr, r_ptr, wh_ptr,
    h_ptr, hg_ptr, hu_ptr, logit_ptr, gate_ptr, idx_ptr,
    T, default_row, inv_temperature,
    E: tl.constexpr, R: tl.constexpr, RU: tl.constexpr, TOP_K: tl.constexpr,
    EP: tl.constexpr, ERP: tl.constexpr, RUP: tl.constexpr, KP: tl.constexpr,
    HAS_WX: tl.constexpr, HAS_R: tl.constexpr, HAS_WH: tl.constexpr, HAS_U: tl.constexpr,
    SHRINK: tl.constexpr, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Sum the split-K partials of _shrink and finish the routing, per block of tokens."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    tok = t.to(tl.int64)
    col = tl.arange(0, EP)
    c = tl.arange(0, ERP)
    j = tl.arange(0, RUP)
    h = tl.zeros((BLOCK_T, ERP), dtype=tl.float32)
    logits = tl.zeros((BLOCK_T, EP), dtype=tl.float32)
    hu = tl.zeros((BLOCK_T, RUP), dtype=tl.float32)
    for s in range(SPLIT):
        row = s * T + tok
        if SHRINK:
            h += tl.load(ph_ptr + row[:, None] * (E * R) + c[None, :], mask=tmask[:, None] & (c < E * R)[None, :], other=0.0)
        if HAS_WX:
            logits += tl.load(plogit_ptr + row[:, None] * E + col[None, :], mask=tmask[:, None] & (col < E)[None, :], other=0.0)
        if HAS_U:
            hu += tl.load(phu_ptr + row[:, None] * RU + j[None, :], mask=tmask[:, None] & (j < RU)[None, :], other=0.0)
    _finish_routing(h, logits, hu, tok, tmask, uid_ptr, r_ptr, wh_ptr, h_ptr, hg_ptr, hu_ptr, logit_ptr,
                    gate_ptr, idx_ptr, default_row, inv_temperature, E, R, RU, TOP_K, EP, ERP, RUP, KP,
                    BLOCK_T, HAS_R, HAS_WH, HAS_U, SHRINK, DT, PREC)


@triton.jit
def _expand(
    hg_ptr, hu_ptr, order_ptr, run_ptr, run_user_ptr, b_ptr, ub_ptr, base_ptr, extra_ptr, y_ptr,
    T, scaling, user_scaling,
    OUT: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RU: tl.constexpr,
    ERP: tl.constexpr, RUP: tl.constexpr, HAS_U: tl.constexpr, DENSE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """DENSE=False (grouped strategy): the experts' sum arrives in extra [T, OUT] fp32.
    y may be base_out itself (each element is read, then written, by one program)."""
    pos, pmask, tok, prun, r_first, r_last = _block_tokens(order_ptr, run_ptr, T, BLOCK_T)
    o = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    omask = o < OUT
    tom = pmask[:, None] & omask[None, :]
    if DENSE:
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for c0 in range(0, ERP, BLOCK_C):  # one step for 16-bit inputs
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < E * R
            hg = tl.load(hg_ptr + tok[:, None] * (E * R) + c[None, :], mask=pmask[:, None] & cmask[None, :], other=0.0)
            # B [E, out, r] read as B_all^T [E*r, out]: column c = (e, i) sits at e*out*r + i.
            boff = (c // R) * (OUT * R) + (c % R)
            b = tl.load(b_ptr + boff[:, None] + o[None, :] * R, mask=cmask[:, None] & omask[None, :], other=0.0)
            acc = tl.dot(hg.to(DT), b.to(DT), acc, input_precision=PREC)
        acc = acc * scaling
    else:
        acc = tl.load(extra_ptr + tok[:, None] * OUT + o[None, :], mask=tom, other=0.0)
    if HAS_U:
        j = tl.arange(0, RUP)
        hu = tl.load(hu_ptr + tok[:, None] * RU + j[None, :], mask=pmask[:, None] & (j < RU)[None, :], other=0.0)
        accu = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for rr in range(r_first, r_last + 1):
            u = tl.load(run_user_ptr + rr)
            if u >= 0:
                ub = tl.load(ub_ptr + u * (OUT * RU) + o[None, :] * RU + j[:, None],
                             mask=(j < RU)[:, None] & omask[None, :], other=0.0)
                hm = tl.where((prun == rr)[:, None], hu, 0.0)
                accu = tl.dot(hm.to(DT), ub.to(DT), accu, input_precision=PREC)
        acc += accu * user_scaling
    base = tl.load(base_ptr + tok[:, None] * OUT + o[None, :], mask=tom, other=0.0).to(tl.float32)
    tl.store(y_ptr + tok[:, None] * OUT + o[None, :], (base + acc).to(y_ptr.dtype.element_ty), mask=tom)


# -- backward ---------------------------------------------------------------------------------


@triton.jit
def _bwd_dh(
    dy_ptr, order_ptr, run_ptr, run_user_ptr, uid_ptr, b_ptr, ub_ptr, wh_ptr, h_ptr, logit_ptr, gate_ptr, idx_ptr,
    dlext_ptr, dgext_ptr, dslot_ptr, dcat_ptr, dlogit_ptr, dhu_ptr,
    T, scaling, user_scaling, inv_temperature,
    OUT: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RU: tl.constexpr, TOP_K: tl.constexpr,
    EP: tl.constexpr, ERP: tl.constexpr, RUP: tl.constexpr, KP: tl.constexpr, CW: tl.constexpr, LOFF: tl.constexpr,
    HAS_WH: tl.constexpr, HAS_U: tl.constexpr, HAS_DLEXT: tl.constexpr, HAS_DGEXT: tl.constexpr,
    DENSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """dcat [T, CW] (input dtype) gets dh in columns [0, E*r) (dense) and d logits in
    [LOFF, LOFF + E); d logits also go to dlogit [T, E] fp32. DENSE=False (grouped strategy):
    the experts' d gate per (token, slot) arrives in dslot [T, k]."""
    pos, pmask, tok, prun, r_first, r_last = _block_tokens(order_ptr, run_ptr, T, BLOCK_T)
    col = tl.arange(0, EP)
    c = tl.arange(0, ERP)
    cmask = c < E * R
    j = tl.arange(0, RUP)
    kcol = tl.arange(0, KP)
    boff = (c // R) * (OUT * R) + (c % R)

    dhg = tl.zeros((BLOCK_T, ERP), dtype=tl.float32)
    dhu = tl.zeros((BLOCK_T, RUP), dtype=tl.float32)
    for n0 in range(0, OUT, BLOCK_N):
        o = n0 + tl.arange(0, BLOCK_N)
        omask = o < OUT
        dy = tl.load(dy_ptr + tok[:, None] * OUT + o[None, :], mask=pmask[:, None] & omask[None, :], other=0.0).to(DT)
        if DENSE:
            b = tl.load(b_ptr + boff[None, :] + o[:, None] * R, mask=omask[:, None] & cmask[None, :], other=0.0)
            dhg = tl.dot(dy, b.to(DT), dhg, input_precision=PREC)
        if HAS_U:
            for rr in range(r_first, r_last + 1):
                u = tl.load(run_user_ptr + rr)
                if u >= 0:
                    ub = tl.load(ub_ptr + u * (OUT * RU) + o[:, None] * RU + j[None, :],
                                 mask=omask[:, None] & (j < RU)[None, :], other=0.0)
                    part = tl.dot(dy, ub.to(DT), input_precision=PREC)
                    dhu += tl.where((prun == rr)[:, None], part, 0.0)
    dhg = dhg * scaling
    dhu = dhu * user_scaling

    te = pmask[:, None] & (col < E)[None, :]
    tk = pmask[:, None] & (kcol < TOP_K)[None, :]
    logits = tl.load(logit_ptr + tok[:, None] * E + col[None, :], mask=te, other=0.0)
    idx = tl.load(idx_ptr + tok[:, None] * TOP_K + kcol[None, :], mask=tk, other=-1).to(tl.int32)
    if DENSE:
        h = tl.load(h_ptr + tok[:, None] * (E * R) + c[None, :], mask=pmask[:, None] & cmask[None, :], other=0.0)
        prod = dhg * h
    kept = tl.zeros((BLOCK_T, EP), dtype=tl.float32)
    dgate = tl.zeros((BLOCK_T, EP), dtype=tl.float32)
    for s in range(TOP_K):
        sel = slot(idx, kcol, s)
        if DENSE:  # d gate of expert e: sum over its r columns of d(g*h) * h
            d = tl.sum(tl.where((c // R)[None, :] == sel[:, None], prod, 0.0), axis=1)
        else:
            d = tl.load(dslot_ptr + tok * TOP_K + s, mask=pmask, other=0.0)
        if HAS_DGEXT:
            d += tl.load(dgext_ptr + tok * TOP_K + s, mask=pmask, other=0.0).to(tl.float32)
        kept = tl.where(col[None, :] == sel[:, None], 1.0, kept)
        dgate = tl.where(col[None, :] == sel[:, None], d[:, None], dgate)
    p = softmax_rows(logits, col, E, inv_temperature)
    dlogits = topk_backward(p, kept, dgate, inv_temperature)
    if HAS_DLEXT:
        dlogits += tl.load(dlext_ptr + tok[:, None] * E + col[None, :], mask=te, other=0.0).to(tl.float32)
    dlogits = tl.where(te, dlogits, 0.0)
    if HAS_WH:  # dh_u += d logits W_h
        wh = tl.load(wh_ptr + col[:, None] * RU + j[None, :], mask=(col < E)[:, None] & (j < RU)[None, :], other=0.0)
        dhu += _dot_f32(dlogits, wh.to(DT), DT, PREC)

    if DENSE:
        gates = tl.load(gate_ptr + tok[:, None] * TOP_K + kcol[None, :], mask=tk, other=0.0)
        gc = _gate_columns(idx, gates, kcol, c, BLOCK_T, ERP, R, E * R, TOP_K)
        tl.store(dcat_ptr + tok[:, None] * CW + c[None, :], (dhg * gc).to(dcat_ptr.dtype.element_ty),
                 mask=pmask[:, None] & cmask[None, :])
    tl.store(dcat_ptr + tok[:, None] * CW + LOFF + col[None, :], dlogits.to(dcat_ptr.dtype.element_ty), mask=te)
    tl.store(dlogit_ptr + tok[:, None] * E + col[None, :], dlogits, mask=te)
    if HAS_U:
        uid = tl.load(uid_ptr + tok, mask=pmask, other=-1)
        tl.store(dhu_ptr + tok[:, None] * RU + j[None, :], tl.where((uid >= 0)[:, None], dhu, 0.0),
                 mask=pmask[:, None] & (j < RU)[None, :])


@triton.jit
def _bwd_dh_wide(
    dy_ptr, b_ptr, h_ptr, gate_ptr, idx_ptr, dslot_ptr, dcat_ptr, T, scaling,
    OUT: tl.constexpr, E: tl.constexpr, R: tl.constexpr, TOP_K: tl.constexpr, KP: tl.constexpr, CW: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Grouped strategy, dense d(g*h) = s_g dy B_all for a tile of tokens and a chunk of whole
    experts' columns (dy read once per chunk, no gather): d gate of each (token, slot) whose
    expert lies in the chunk into dslot [T, k], and dh = g d(g*h) into dcat's first E*r
    columns (zero where the token did not pick the expert)."""
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
        dy = tl.load(dy_ptr + tok[:, None] * OUT + o[None, :], mask=tmask[:, None] & omask[None, :], other=0.0)
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
    gc = _gate_columns(idx, gates, kcol, c, BLOCK_T, BLOCK_C, R, E * R, TOP_K)
    tl.store(dcat_ptr + tok[:, None] * CW + c[None, :], (dhg * gc).to(dcat_ptr.dtype.element_ty), mask=tc)


@triton.jit
def _bwd_dx(
    dcat_ptr, dhu_ptr, order_ptr, run_ptr, run_user_ptr, a_ptr, ua_ptr, wx_ptr, extra_ptr, dxl_ptr, dx_ptr,
    T,
    IN: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RU: tl.constexpr, EP: tl.constexpr, ERP: tl.constexpr,
    RUP: tl.constexpr, CW: tl.constexpr, LOFF: tl.constexpr,
    HAS_WX: tl.constexpr, HAS_U: tl.constexpr, SAME_X: tl.constexpr, DENSE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """DENSE=False (grouped strategy): the experts' part of dx arrives in extra [T, IN] fp32.
    dcat holds dh at column 0 and d logits at column LOFF."""
    pos, pmask, tok, prun, r_first, r_last = _block_tokens(order_ptr, run_ptr, T, BLOCK_T)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < IN
    tk = pmask[:, None] & kmask[None, :]
    if DENSE:
        dxl = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        for c0 in range(0, ERP, BLOCK_C):  # one step for 16-bit inputs
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < E * R
            dh = tl.load(dcat_ptr + tok[:, None] * CW + c[None, :], mask=pmask[:, None] & cmask[None, :], other=0.0)
            a = tl.load(a_ptr + c[:, None] * IN + k[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            dxl = tl.dot(dh.to(DT), a.to(DT), dxl, input_precision=PREC)
    else:
        dxl = tl.load(extra_ptr + tok[:, None] * IN + k[None, :], mask=tk, other=0.0)
    if HAS_U:
        j = tl.arange(0, RUP)
        dhu = tl.load(dhu_ptr + tok[:, None] * RU + j[None, :], mask=pmask[:, None] & (j < RU)[None, :], other=0.0)
        for rr in range(r_first, r_last + 1):
            u = tl.load(run_user_ptr + rr)
            if u >= 0:
                ua = tl.load(ua_ptr + u * (RU * IN) + j[:, None] * IN + k[None, :],
                             mask=(j < RU)[:, None] & kmask[None, :], other=0.0)
                dm = tl.where((prun == rr)[:, None], dhu, 0.0)
                dxl = tl.dot(dm.to(DT), ua.to(DT), dxl, input_precision=PREC)
    if HAS_WX:
        col = tl.arange(0, EP)
        dl = tl.load(dcat_ptr + tok[:, None] * CW + LOFF + col[None, :], mask=pmask[:, None] & (col < E)[None, :], other=0.0)
        w = tl.load(wx_ptr + col[:, None] * IN + k[None, :], mask=(col < E)[:, None] & kmask[None, :], other=0.0)
        if SAME_X:
            dxl = tl.dot(dl.to(DT), w.to(DT), dxl, input_precision=PREC)
        else:
            dxr = tl.dot(dl.to(DT), w.to(DT), input_precision=PREC)
            tl.store(dx_ptr + tok[:, None] * IN + k[None, :], dxr.to(dx_ptr.dtype.element_ty), mask=tk)
    tl.store(dxl_ptr + tok[:, None] * IN + k[None, :], dxl.to(dxl_ptr.dtype.element_ty), mask=tk)


@triton.jit
def _wgrad_in(
    dcat_ptr, dhu_ptr, x_ptr, order_ptr, run_ptr, run_user_ptr, run_end_ptr, ga_ptr, gwx_ptr, gua_ptr, T,
    IN: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RU: tl.constexpr, EP: tl.constexpr, ERP: tl.constexpr,
    RUP: tl.constexpr, CW: tl.constexpr, LOFF: tl.constexpr,
    DO_A: tl.constexpr, DO_WX: tl.constexpr, DO_U: tl.constexpr, COMPACT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """The weight gradients that read x, in one pass: a tile of x's features streamed over
    every token in sorted order gives lora_A's [E*r, IN] = dh^T x and router_x's [E, IN] =
    d logits^T x, and per run the user's bank row [r_u, IN] = dh_u^T x, stored when the
    run ends (row u, or row r when COMPACT)."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = k < IN
    c = tl.arange(0, ERP)
    col = tl.arange(0, EP)
    j = tl.arange(0, RUP)
    acc_a = tl.zeros((ERP, BLOCK_K), dtype=tl.float32)
    acc_l = tl.zeros((EP, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((RUP, BLOCK_K), dtype=tl.float32)
    for p0 in range(0, T, BLOCK_P):
        pos = p0 + tl.arange(0, BLOCK_P)
        pm = pos < T
        tok = tl.load(order_ptr + pos, mask=pm, other=0)
        xt = tl.load(x_ptr + tok[:, None] * IN + k[None, :], mask=pm[:, None] & kmask[None, :], other=0.0).to(DT)
        if DO_A:
            dh = tl.load(dcat_ptr + tok[:, None] * CW + c[None, :], mask=pm[:, None] & (c < E * R)[None, :], other=0.0)
            acc_a = tl.dot(tl.trans(dh.to(DT)), xt, acc_a, input_precision=PREC)
        if DO_WX:
            dl = tl.load(dcat_ptr + tok[:, None] * CW + LOFF + col[None, :], mask=pm[:, None] & (col < E)[None, :],
                         other=0.0)
            acc_l = tl.dot(tl.trans(dl.to(DT)), xt, acc_l, input_precision=PREC)
        if DO_U:
            prun, r_first, r_last = _runs(run_ptr, p0, pos, pm, T, BLOCK_P)
            dhu = tl.load(dhu_ptr + tok[:, None] * RU + j[None, :], mask=pm[:, None] & (j < RU)[None, :], other=0.0)
            for rr in range(r_first, r_last + 1):
                dm = tl.where((prun == rr)[:, None], dhu, 0.0)
                acc_u = tl.dot(tl.trans(dm.to(DT)), xt, acc_u, input_precision=PREC)
                if tl.load(run_end_ptr + rr) <= p0 + BLOCK_P:  # the run ends here: its row is whole
                    u, row = _bank_row(run_user_ptr, rr, COMPACT)
                    if u >= 0:
                        tl.store(gua_ptr + row * (RU * IN) + j[:, None] * IN + k[None, :],
                                 acc_u.to(gua_ptr.dtype.element_ty), mask=(j < RU)[:, None] & kmask[None, :])
                    acc_u = tl.zeros((RUP, BLOCK_K), dtype=tl.float32)
    if DO_A:
        tl.store(ga_ptr + c[:, None] * IN + k[None, :], acc_a.to(ga_ptr.dtype.element_ty),
                 mask=(c < E * R)[:, None] & kmask[None, :])
    if DO_WX:
        tl.store(gwx_ptr + col[:, None] * IN + k[None, :], acc_l.to(gwx_ptr.dtype.element_ty),
                 mask=(col < E)[:, None] & kmask[None, :])


@triton.jit
def _wgrad_out(
    dy_ptr, hg_ptr, hu_ptr, order_ptr, run_ptr, run_user_ptr, run_end_ptr, gb_ptr, gub_ptr, T, scaling, user_scaling,
    OUT: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RU: tl.constexpr, ERP: tl.constexpr, RUP: tl.constexpr,
    DO_B: tl.constexpr, DO_U: tl.constexpr, COMPACT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """The weight gradients that read dy, in one pass: a tile of dy's features streamed over
    every token gives lora_B's (s_g dy^T (g h), stored as [E, out, r]) and per run the
    user's bank row s_u dy^T h_u [out, r_u], stored when the run ends."""
    o = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    omask = o < OUT
    c = tl.arange(0, ERP)
    j = tl.arange(0, RUP)
    acc_b = tl.zeros((BLOCK_M, ERP), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, RUP), dtype=tl.float32)
    for p0 in range(0, T, BLOCK_P):
        pos = p0 + tl.arange(0, BLOCK_P)
        pm = pos < T
        tok = tl.load(order_ptr + pos, mask=pm, other=0)
        dyt = tl.trans(tl.load(dy_ptr + tok[:, None] * OUT + o[None, :], mask=pm[:, None] & omask[None, :],
                               other=0.0).to(DT))
        if DO_B:
            hg = tl.load(hg_ptr + tok[:, None] * (E * R) + c[None, :], mask=pm[:, None] & (c < E * R)[None, :], other=0.0)
            acc_b = tl.dot(dyt, hg.to(DT), acc_b, input_precision=PREC)
        if DO_U:
            prun, r_first, r_last = _runs(run_ptr, p0, pos, pm, T, BLOCK_P)
            hu = tl.load(hu_ptr + tok[:, None] * RU + j[None, :], mask=pm[:, None] & (j < RU)[None, :], other=0.0)
            for rr in range(r_first, r_last + 1):
                hm = tl.where((prun == rr)[:, None], hu, 0.0)
                acc_u = tl.dot(dyt, hm.to(DT), acc_u, input_precision=PREC)
                if tl.load(run_end_ptr + rr) <= p0 + BLOCK_P:  # the run ends here: its row is whole
                    u, row = _bank_row(run_user_ptr, rr, COMPACT)
                    if u >= 0:
                        tl.store(gub_ptr + row * (OUT * RU) + o[:, None] * RU + j[None, :],
                                 (acc_u * user_scaling).to(gub_ptr.dtype.element_ty),
                                 mask=omask[:, None] & (j < RU)[None, :])
                    acc_u = tl.zeros((BLOCK_M, RUP), dtype=tl.float32)
    if DO_B:  # column c = (e, i) of B_all^T goes to lora_B[e, o, i]
        boff = (c // R) * (OUT * R) + (c % R)
        tl.store(gb_ptr + boff[None, :] + o[:, None] * R, (acc_b * scaling).to(gb_ptr.dtype.element_ty),
                 mask=omask[:, None] & (c < E * R)[None, :])


# -- launchers ------------------------------------------------------------------------------

DENSE, GROUPED = "dense", "grouped"
STRATEGIES = (DENSE, GROUPED)

# Dense is picked automatically up to this many expert columns (E*r).
DENSE_AUTO_COLUMNS = 128


def choose_strategy(num_experts: int, rank: int) -> str:
    """Dense-masked while all experts' columns fit a small tile, grouped beyond."""
    return DENSE if num_experts * rank <= DENSE_AUTO_COLUMNS else GROUPED


class _Call:
    """Sizes, paddings, dtypes and launch configurations of one call, computed once."""

    def __init__(self, x2: Tensor, lora_A: Tensor, lora_B: Tensor, top_k: int, r_u: int, strategy: str) -> None:
        self.T, self.IN = x2.shape
        self.E, self.R, _ = lora_A.shape
        self.OUT = lora_B.shape[1]
        self.RU = r_u
        self.TOP_K = top_k
        self.dense = strategy == DENSE
        self.ER = self.E * self.R
        self.EP = _pow2(self.E)
        self.ERP = _pow2(self.ER) if self.dense else 16  # grouped: no [T, E*r] tile
        self.RP = _pow2(self.R)
        self.RUP = _pow2(r_u)
        self.KP = _pow2(top_k, floor=2)
        # Grouped up to WIDE_MAX_COLUMNS: the expand and dx read g*h and dh in a dense layout.
        self.wide = not self.dense and self.ER <= triton_grouped.WIDE_MAX_COLUMNS
        # ... and while the dense FLOPs cost less than k gathers of x, the shrink too.
        self.wide_shrink = self.wide and self.ER <= triton_grouped.WIDE_SHRINK_PER_SLOT * top_k
        self.ERX = _pow2(self.ER) if (self.dense or self.wide) else 16  # columns the expand and dx see
        self.CW = (self.ER if (self.dense or self.wide) else 0) + self.E  # width of the backward's dcat
        self.LOFF = self.CW - self.E  # where d logits start in dcat
        self.dtype = x2.dtype
        self.DT = _dot_dtype(x2.dtype)
        self.PREC = _precision(x2.dtype)
        if self.dense and self.ER > DENSE_MAX_COLUMNS:
            raise ValueError(f"the dense Triton strategy holds E*r <= {DENSE_MAX_COLUMNS}, got {self.ER}")
        if self.EP > 1024:
            raise ValueError(f"the Triton kernels route over at most 1024 experts, got {self.E}")
        device = x2.device
        self.target = _launch.target_of(device)
        size = _launch.size_class(self.T)
        width = self.ERP if self.dense else 16
        xwidth = self.ERP if self.dense else (256 if self.wide else 16)  # the expand's and dx's
        fp32 = x2.dtype == torch.float32

        def cfg(kind, size="any", width=0):
            return _launch.config(kind, self.target, size, width, fp32)

        if self.dense:
            self.shrink, self.bwd_dh = cfg("shrink", size, width), cfg("bwd_dh", size, width)
        else:  # the grouped strategy's routing kernels: keyed by the experts a row holds
            self.shrink, self.bwd_dh = cfg("route", "any", self.EP), cfg("route_bwd", "any", self.EP)
        self.route = cfg("reduce", "any", width)
        self.expand = cfg("expand", size, xwidth)
        self.bwd_dx = cfg("bwd_dx", size, xwidth) if (self.dense or self.wide) else cfg("route_dx", "any", self.EP)
        self.grouped = cfg("grouped")
        self.shrink_wide = cfg("shrink_wide")
        self.bwd_dh_wide = cfg("bwd_dh_wide")
        self.wgrad_in = cfg("wgrad_in", "any", width)
        self.wgrad_out = cfg("wgrad_out", "any", width)
        self.BLOCK_P = self.grouped[0]
        # The expert columns one dot takes: all of them for 16-bit inputs (one tensor-core
        # dot), a chunk for fp32, whose CUDA-core dots hold both operands in registers.
        self.BLOCK_C = min(self.ERX, _launch.FP32_COLUMN_CHUNK if fp32 else _launch.WIDE_COLUMN_CHUNK)
        self.BLOCK_CW = min(self.ERX, _launch.FP32_COLUMN_CHUNK if fp32 else _launch.SHRINK_COLUMN_CHUNK)
        # The backward's d(g*h) dense too, in column chunks that hold whole experts.
        self.wide_bwd = self.wide_shrink and self.BLOCK_CW % self.R == 0
        self.split = 1
        if size == "decode":  # split the features so that the shrink covers every SM
            blocks = max(1, triton.cdiv(self.T, self.shrink[0]))  # T = 0: no launch, no split
            tiles = triton.cdiv(self.IN, self.shrink[1])
            self.split = max(1, min(tiles, triton.cdiv(_launch.num_sms(device, self.target), blocks)))

    def consts(self) -> dict:
        return dict(E=self.E, R=self.R, RU=self.RU, ERP=self.ERP, RUP=self.RUP, DT=self.DT, PREC=self.PREC)

    def grouped_consts(self) -> dict:
        return dict(E=self.E, R=self.R, RP=self.RP, TOP_K=self.TOP_K, BLOCK_P=self.BLOCK_P, DT=self.DT,
                    PREC=self.PREC)

    def num_pairs(self) -> int:
        return self.T * self.TOP_K


def _side_widths(s: _Call) -> tuple[int, int]:
    """Rows and width of the saved h and g*h: [T, E*r] dense (and grouped with the dense
    shrink), [T*k, r] grouped (sorted pairs)."""
    return (s.T, s.ER) if (s.dense or s.wide_shrink) else (s.num_pairs(), s.R)


def _meta_len(s: _Call) -> int:
    if s.dense:
        return 0
    return s.num_pairs() + s.E + 1 + 2 * triton_grouped.num_blocks(s.num_pairs(), s.E, s.BLOCK_P)


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _bank_bytes(bank: Tensor, rows: Optional[int]) -> int:
    """Bytes of the bank rows a batch reads (rows None: the whole bank)."""
    n = bank.shape[0] if rows is None else min(rows, bank.shape[0])
    return n * (bank.numel() // max(1, bank.shape[0])) * bank.element_size()


def forward(s: _Call, x2, xl2, base2, table, lora_A, lora_B, scaling, temperature,
            router_x, router_user, router_h, user_A, user_B, user_scaling, y=None, bank_rows=None):
    """Launch the forward. All 2-D [T, *] contiguous; `table` is the plan's [6, T].
    bank_rows: how many bank rows the batch reads (for the byte counts; default the bank).

    Returns y (written into `y` when given, which may be base2 itself) and the side outputs
    the backward needs: (h, g*h, h_u, logits, gates fp32, indices, meta), meta packing the
    grouped schedule (empty for dense)."""
    dev = x2.device
    f32 = dict(device=dev, dtype=torch.float32)
    T, has_u = s.T, s.RU > 0
    uid, order, run, run_user = table[UID], table[ORDER], table[RUN], table[RUN_USER]
    rows, width = _side_widths(s)
    h = _empty(rows, width, **f32)
    hg = _empty(rows, width, device=dev, dtype=x2.dtype)
    hu = _empty(T, max(s.RU, 1), **f32)
    logits = _empty(T, s.E, **f32)
    gates = _empty(T, s.TOP_K, **f32)
    idx = _empty(T, s.TOP_K, device=dev, dtype=torch.long)
    dummy = x2
    has_wx, has_r, has_wh = router_x is not None, router_user is not None, router_h is not None and has_u
    routing = dict(HAS_R=has_r, HAS_WH=has_wh, HAS_U=has_u, SHRINK=s.dense, SPLIT=s.split)
    default_row = (router_user.shape[0] - 1) if has_r else 0
    weights = (lora_A if s.dense else None, router_x)
    bank = _bank_bytes(user_A, bank_rows) if has_u else 0
    bank_b = _bank_bytes(user_B, bank_rows) if has_u else 0
    if s.split == 1:
        outs = (h, hg, hu, logits, gates, idx)
    else:
        outs = (_empty(s.split, T, s.ER, **f32) if s.dense else dummy,
                hg, _empty(s.split, T, s.RU, **f32) if has_u else dummy,
                _empty(s.split, T, s.E, **f32) if has_wx else dummy, gates, idx)
    bt, bk, warps, stages = s.shrink
    same_x = xl2 is x2
    read = _nbytes(xl2, None if same_x else x2, *weights) + bank + (_nbytes(router_h) if s.split == 1 else 0)
    routed = _nbytes(*((h, hg) if s.dense else ()), hu if has_u else None, logits, gates, idx)  # what routing writes
    written = (routed if s.split == 1
               else 4 * s.split * T * ((s.ER if s.dense else 0) + (s.E if has_wx else 0) + s.RU))
    flops = 2 * T * s.IN * ((s.ER if s.dense else 0) + (s.E if has_wx else 0) + s.RU)
    _launch.launch(
        _shrink, (triton.cdiv(T, bt), s.split),
        (x2, xl2, order, run, run_user, uid, lora_A, router_x if has_wx else dummy,
         user_A if has_u else dummy, router_user if has_r else dummy, router_h if has_wh else dummy,
         outs[0], outs[1], outs[2], outs[3], outs[4], outs[5],
         T, default_row, 1.0 / temperature),
        dict(IN=s.IN, TOP_K=s.TOP_K, EP=s.EP, KP=s.KP, HAS_WX=has_wx, SAME_X=same_x, BLOCK_T=bt, BLOCK_K=bk,
             **routing, **s.consts()),
        warps, stages, bytes=read + written, flops=flops, note="shrink + route" if s.split == 1 else "shrink (split-K)",
    )
    if s.split > 1:
        bt, _, warps, stages = s.route
        _launch.launch(
            _route, (triton.cdiv(T, bt),),
            (outs[0], outs[3], outs[2], uid, router_user if has_r else dummy, router_h if has_wh else dummy,
             h, hg, hu, logits, gates, idx, T, default_row, 1.0 / temperature),
            dict(E=s.E, R=s.R, RU=s.RU, TOP_K=s.TOP_K, EP=s.EP, ERP=s.ERP, RUP=s.RUP, KP=s.KP, HAS_WX=has_wx,
                 BLOCK_T=bt, DT=s.DT, PREC=s.PREC, **routing),
            warps, stages, bytes=written + routed + _nbytes(router_h),
            note="route (sum split-K partials)",
        )
    extra = dummy
    meta = torch.empty(0, dtype=torch.long, device=dev)
    if not s.dense:
        sched = triton_grouped.make_schedule(idx, s.E, s.BLOCK_P)
        meta = sched.pack()
        nb = sched.block_expert.numel()
        args = (sched.order, sched.seg, sched.block_expert, sched.block_start)
        _, bk, warps, stages = s.grouped
        P = s.num_pairs()
        if s.wide_shrink:
            wide = hg
            bt, bkw, warps_w, stages_w = s.shrink_wide
            _launch.launch(_shrink_wide, (triton.cdiv(T, bt), triton.cdiv(s.ER, s.BLOCK_CW)),
                           (xl2, lora_A, gates, idx, h, hg, T),
                           dict(IN=s.IN, E=s.E, R=s.R, TOP_K=s.TOP_K, KP=s.KP, BLOCK_T=bt, BLOCK_K=bkw,
                                BLOCK_C=s.BLOCK_CW, DT=s.DT, PREC=s.PREC), warps_w, stages_w,
                           bytes=_nbytes(xl2, lora_A, h, hg, gates, idx), flops=2 * T * s.IN * s.ER,
                           note="grouped shrink, dense (every expert)")
        else:
            # zeros: the columns of the experts a token did not pick
            wide = torch.zeros(T, s.ER, device=dev, dtype=x2.dtype) if s.wide else dummy
            _launch.launch(triton_grouped._shrink, (nb,), (xl2, lora_A, gates, *args, h, hg, wide),
                           dict(IN=s.IN, BLOCK_K=bk, WIDE=s.wide, **s.grouped_consts()), warps, stages,
                           bytes=s.TOP_K * _nbytes(xl2) + _nbytes(lora_A, h, hg) + (_nbytes(wide) if s.wide else 0),
                           flops=2 * P * s.IN * s.R, note="grouped shrink")
        if not s.wide:
            extra = torch.zeros(T, s.OUT, **f32)  # accumulated by atomic adds: must start at 0
            _launch.launch(triton_grouped._expand, (nb, triton.cdiv(s.OUT, bk)), (hg, lora_B, *args, extra, scaling),
                           dict(OUT=s.OUT, BLOCK_N=bk, **s.grouped_consts()), warps, stages,
                           bytes=_nbytes(hg, lora_B) + 2 * s.TOP_K * _nbytes(extra), flops=2 * P * s.OUT * s.R,
                           note="grouped expand (fp32 atomics)")
    if y is None:
        y = _empty(T, s.OUT, device=dev, dtype=base2.dtype)
    bt, bn, warps, stages = s.expand
    dense_in = s.dense or s.wide
    gh = hg if s.dense else wide
    _launch.launch(
        _expand, (triton.cdiv(T, bt), triton.cdiv(s.OUT, bn)),
        (gh, hu, order, run, run_user, lora_B, user_B if has_u else dummy, base2, extra, y, T, scaling, user_scaling),
        dict(s.consts(), ERP=s.ERX, OUT=s.OUT, HAS_U=has_u, DENSE=dense_in, BLOCK_T=bt, BLOCK_N=bn, BLOCK_C=s.BLOCK_C),
        warps, stages,
        bytes=_nbytes(base2, y, lora_B if dense_in else extra) + bank_b + (_nbytes(gh) if dense_in else 0)
        + (_nbytes(hu) if has_u else 0),
        flops=2 * T * s.OUT * ((s.ER if dense_in else 0) + s.RU), note="expand (adds into base_out)",
    )
    return y, (h, hg, hu, logits, gates, idx, meta)


def _segment_gemm(s: _Call, sched, left, right, M, N, left_by_token, right_by_token, scale, dtype, left_wide=False,
                  right_wide=False):
    """Per expert, over its (token, slot) pairs: scale * L^T R. *_wide: the operand is a dense
    [T, E*r + ...] layout (its row stride is taken from the tensor)."""
    out = _empty(s.E, M, N, device=left.device, dtype=dtype)
    bm, bn = min(_pow2(M), 64), min(_pow2(N), 64)
    _, _, warps, stages = s.grouped
    _launch.launch(
        triton_grouped._segment_gemm, (s.E, triton.cdiv(M, bm), triton.cdiv(N, bn)),
        (left, right, sched.order, sched.seg, out, scale),
        dict(M=M, N=N, L_BY_TOKEN=left_by_token, R_BY_TOKEN=right_by_token, L_WIDE=left_wide, R_WIDE=right_wide,
             L_STRIDE=left.shape[-1], R_STRIDE=right.shape[-1], TOP_K=s.TOP_K, BLOCK_P=s.BLOCK_P,
             BLOCK_M=bm, BLOCK_N=bn, DT=s.DT, PREC=s.PREC),
        warps, stages, bytes=_nbytes(out, left, right), flops=2 * s.num_pairs() * M * N, note="grouped weight gradient",
    )
    return out


def backward(s: _Call, dy2, dgates, dlext, saved, x2, xl2, table, max_runs, lora_A, lora_B, scaling, temperature,
             router_x, router_user, router_h, user_A, user_B, user_scaling, needs, compact):
    """Gradients by name: x, x_lora, lora_A, lora_B, router_x, router_user, router_h, user_A,
    user_B (absent: not needed). compact: the bank's as [max_runs, ...] rows of the runs, for
    a sparse gradient."""
    h, hg, hu, logits, gates, idx, meta = saved
    has_u = s.RU > 0
    dev = x2.device
    f32 = dict(device=dev, dtype=torch.float32)
    T = s.T
    order, run, run_user, uid = table[ORDER], table[RUN], table[RUN_USER], table[UID]
    dy2 = dy2.contiguous()
    # wide (pairs write dh): zeros, the columns of the experts a token did not pick
    dcat = (torch.zeros if s.wide and not s.wide_bwd else _empty)(T, s.CW, device=dev, dtype=x2.dtype)
    dhu = _empty(T, max(s.RU, 1), **f32)
    dlogits = _empty(T, s.E, **f32)
    dummy = x2
    dslot = dummy
    extra = dummy
    has_wh = router_h is not None and has_u
    if not s.dense:
        sched = triton_grouped.Schedule.unpack(meta, s.num_pairs(), s.E, s.BLOCK_P)
        nb = sched.block_expert.numel()
        args = (sched.order, sched.seg, sched.block_expert, sched.block_start)
        dslot = _empty(T, s.TOP_K, **f32)
        dh = _empty(s.num_pairs(), s.R, **f32) if not s.wide_bwd else dummy
        _, bk, warps, stages = s.grouped
    if not s.dense and s.wide_bwd:
        bt, bn_w, warps_w, stages_w = s.bwd_dh_wide
        _launch.launch(_bwd_dh_wide, (triton.cdiv(T, bt), triton.cdiv(s.ER, s.BLOCK_CW)),
                       (dy2, lora_B, h, gates, idx, dslot, dcat, T, scaling),
                       dict(OUT=s.OUT, E=s.E, R=s.R, TOP_K=s.TOP_K, KP=s.KP, CW=s.CW, BLOCK_T=bt, BLOCK_N=bn_w,
                            BLOCK_C=s.BLOCK_CW, DT=s.DT, PREC=s.PREC), warps_w, stages_w,
                       bytes=_nbytes(dy2, lora_B, h, gates, idx, dslot) + T * s.ER * x2.element_size(),
                       flops=2 * T * s.OUT * s.ER, note="grouped d(g h), dense (every expert)")
    elif not s.dense:
        _launch.launch(triton_grouped._bwd_dh, (nb,), (dy2, lora_B, h, gates, *args, dh, dslot,
                                                      dcat if s.wide else dummy, scaling),
                       dict(OUT=s.OUT, BLOCK_N=bk, CW=s.CW, WIDE=s.wide, H_WIDE=s.wide_shrink, **s.grouped_consts()), warps, stages,
                       bytes=s.TOP_K * _nbytes(dy2) + _nbytes(lora_B, h, dh, dslot), flops=2 * s.num_pairs() * s.OUT * s.R,
                       note="grouped d(g h)")
        if not s.wide:
            extra = torch.zeros(T, s.IN, **f32)  # accumulated by atomic adds: must start at 0
            _launch.launch(triton_grouped._bwd_dx, (nb, triton.cdiv(s.IN, bk)), (dh, lora_A, *args, extra),
                           dict(IN=s.IN, BLOCK_K=bk, **s.grouped_consts()), warps, stages,
                           bytes=_nbytes(dh, lora_A) + 2 * s.TOP_K * _nbytes(extra),
                           flops=2 * s.num_pairs() * s.IN * s.R, note="grouped dx (fp32 atomics)")
    bt, bn, warps, stages = s.bwd_dh
    _launch.launch(
        _bwd_dh, (triton.cdiv(T, bt),),
        (dy2, order, run, run_user, uid, lora_B, user_B if has_u else dummy, router_h if has_wh else dummy,
         h, logits, gates, idx, dlext.contiguous() if dlext is not None else dummy,
         dgates.contiguous() if dgates is not None else dummy, dslot, dcat, dlogits, dhu,
         T, scaling, user_scaling, 1.0 / temperature),
        dict(OUT=s.OUT, TOP_K=s.TOP_K, EP=s.EP, KP=s.KP, CW=s.CW, LOFF=s.LOFF, HAS_WH=has_wh, HAS_U=has_u,
             HAS_DLEXT=dlext is not None, HAS_DGEXT=dgates is not None, DENSE=s.dense, BLOCK_T=bt, BLOCK_N=bn,
             **s.consts()),
        warps, stages,
        bytes=_nbytes(dy2, lora_B if s.dense else None, dcat, dlogits, dhu, logits, gates, idx)
        + (_nbytes(h) if s.dense else 0) + (_bank_bytes(user_B, max_runs) if has_u else 0),
        flops=2 * T * s.OUT * ((s.ER if s.dense else 0) + s.RU), note="backward: d h, d logits, d h_u",
    )
    same_x = xl2 is x2
    has_wx = router_x is not None
    dxl = _empty(*xl2.shape, device=dev, dtype=xl2.dtype)
    dx = dxl if same_x or not has_wx else _empty(*x2.shape, device=dev, dtype=x2.dtype)
    bt, bk, warps, stages = s.bwd_dx
    dense_in = s.dense or s.wide
    _launch.launch(
        _bwd_dx, (triton.cdiv(T, bt), triton.cdiv(s.IN, bk)),
        (dcat, dhu, order, run, run_user, lora_A, user_A if has_u else dummy, router_x if has_wx else dummy,
         extra, dxl, dx, T),
        dict(s.consts(), ERP=s.ERX, IN=s.IN, EP=s.EP, CW=s.CW, LOFF=s.LOFF, HAS_WX=has_wx, HAS_U=has_u,
             SAME_X=same_x, DENSE=dense_in, BLOCK_T=bt, BLOCK_K=bk, BLOCK_C=s.BLOCK_C),
        warps, stages,
        bytes=_nbytes(dcat, dxl, None if dx is dxl else dx, lora_A if dense_in else extra, router_x)
        + (_nbytes(dhu) + _bank_bytes(user_A, max_runs) if has_u else 0),
        flops=2 * T * s.IN * ((s.ER if dense_in else 0) + (s.E if has_wx else 0) + s.RU), note="backward: dx",
    )
    grads: dict = dict(x=dxl if same_x else (dx if has_wx else None), x_lora=None if same_x else dxl)
    # Weight gradients: one pass over x (lora_A, router_x, the bank's user_A) and one over dy
    # (lora_B, the bank's user_B), on tensor cores in the input dtype with fp32 accumulation.
    need_a = s.dense and needs["lora_A"] and scaling != 0.0
    need_b = s.dense and needs["lora_B"] and scaling != 0.0
    need_wx = has_wx and needs["router_x"]
    need_ua = has_u and needs["user_A"]
    need_ub = has_u and needs["user_B"]
    bank_rows = max_runs if compact else (user_A.shape[0] if has_u else 0)
    wx_here = need_wx and same_x  # router_x reads x, not x_lora: with dropout it gets its own GEMM
    if need_a or wx_here or need_ua:
        ga = _empty(s.ER, s.IN, device=dev, dtype=lora_A.dtype) if need_a else dummy
        gwx = _empty(s.E, s.IN, device=dev, dtype=router_x.dtype) if wx_here else dummy
        gua = torch.zeros(bank_rows, s.RU, s.IN, device=dev, dtype=user_A.dtype) if need_ua else dummy
        bp, bk, warps, stages = s.wgrad_in
        _launch.launch(
            _wgrad_in, (triton.cdiv(s.IN, bk),),
            (dcat, dhu, xl2, order, run, run_user, table[RUN_END], ga, gwx, gua, T),
            dict(IN=s.IN, E=s.E, R=s.R, RU=s.RU, EP=s.EP, ERP=s.ERP, RUP=s.RUP, CW=s.CW,
                 LOFF=s.LOFF, DO_A=need_a, DO_WX=wx_here, DO_U=need_ua, COMPACT=compact,
                 BLOCK_P=bp, BLOCK_K=bk, DT=s.DT, PREC=s.PREC),
            warps, stages, bytes=_nbytes(xl2, dcat, dhu if need_ua else None, None if ga is dummy else ga,
                                         None if gwx is dummy else gwx)
            + (_bank_bytes(gua, max_runs) if need_ua else 0),
            flops=2 * T * s.IN * ((s.ER if need_a else 0) + (s.E if wx_here else 0) + (s.RU if need_ua else 0)),
            note="weight gradients over x (lora_A, router_x, user_A)",
        )
        if need_a:
            grads["lora_A"] = ga.reshape(lora_A.shape)
        if wx_here:
            grads["router_x"] = gwx
        if need_ua:
            grads["user_A"] = gua
    if need_wx and not same_x:
        grads["router_x"] = _matmul_t(dcat[:, s.LOFF:], x2)
    if need_b or need_ub:
        gb = _empty(*lora_B.shape, device=dev, dtype=lora_B.dtype) if need_b else dummy
        gub = torch.zeros(bank_rows, s.OUT, s.RU, device=dev, dtype=user_B.dtype) if need_ub else dummy
        bp, bm, warps, stages = s.wgrad_out
        _launch.launch(
            _wgrad_out, (triton.cdiv(s.OUT, bm),),
            (dy2, hg, hu, order, run, run_user, table[RUN_END], gb, gub, T, scaling, user_scaling),
            dict(OUT=s.OUT, E=s.E, R=s.R, RU=s.RU, ERP=s.ERP, RUP=s.RUP, DO_B=need_b, DO_U=need_ub, COMPACT=compact,
                 BLOCK_P=bp, BLOCK_M=bm, DT=s.DT, PREC=s.PREC),
            warps, stages, bytes=_nbytes(dy2, hg if need_b else None, hu if need_ub else None,
                                         None if gb is dummy else gb) + (_bank_bytes(gub, max_runs) if need_ub else 0),
            flops=2 * T * s.OUT * ((s.ER if need_b else 0) + (s.RU if need_ub else 0)),
            note="weight gradients over dy (lora_B, user_B)",
        )
        if need_b:
            grads["lora_B"] = gb
        if need_ub:
            grads["user_B"] = gub
    if scaling != 0.0 and not s.dense:
        if needs["lora_A"]:
            grads["lora_A"] = _segment_gemm(s, sched, dcat if s.wide_bwd else dh, xl2, s.R, s.IN, False, True, 1.0,
                                            lora_A.dtype, left_wide=s.wide_bwd)
        if needs["lora_B"]:
            grads["lora_B"] = _segment_gemm(s, sched, dy2, hg, s.OUT, s.R, True, False, scaling, lora_B.dtype,
                                            right_wide=s.wide_shrink)
    if router_user is not None and needs["router_user"]:
        rows = torch.where(uid >= 0, uid, router_user.shape[0] - 1)
        if compact:
            grads["router_user"] = (rows, dlogits.to(router_user.dtype))
        else:
            table_grad = torch.zeros(router_user.shape, **f32)
            grads["router_user"] = table_grad.index_add_(0, rows, dlogits).to(router_user.dtype)
    if has_wh and needs["router_h"]:
        grads["router_h"] = (dlogits.t() @ hu).to(router_h.dtype)
    return grads


def _matmul_t(left: Tensor, right: Tensor, scale: float = 1.0) -> Tensor:
    """scale * left^T right over the tokens, in the input dtype with fp32 accumulation
    (cuBLAS); recorded as a launch inside ``launch.recording`` (meta tensors)."""
    out = left.t() @ right
    if scale != 1.0:
        out = out * scale
    if left.device.type == "meta":
        _launch.record_external("matmul", bytes=_nbytes(left, right, out),
                                flops=2 * left.shape[0] * left.shape[1] * right.shape[1])
    return out


# -- torch.library ops: torch.compile and CUDA graphs see each direction as one op ------------

_GRAD_NAMES = ("x", "x_lora", "lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")


def _call_of(x: Tensor, lora_A: Tensor, lora_B: Tensor, top_k: int, user_A: Optional[Tensor], strategy: str):
    x2 = x.reshape(-1, x.shape[-1])
    return _Call(x2, lora_A, lora_B, top_k, user_A.shape[1] if user_A is not None else 0, strategy)


def _contiguous(*ts):
    return [t.contiguous() if t is not None else None for t in ts]


def _run_forward(x, x_lora, base_out, plan, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
                 scaling, top_k, temperature, user_scaling, same_x, strategy, in_place):
    s = _call_of(x, lora_A, lora_B, top_k, user_A, strategy)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    xl2 = x2 if same_x else x_lora.reshape(-1, x.shape[-1]).contiguous()
    base2 = base_out.reshape(-1, base_out.shape[-1])
    if not base2.is_contiguous():
        base2, in_place = base2.contiguous(), False
    p = _contiguous(lora_A, lora_B, router_x, router_user, router_h, user_A, user_B)
    y, side = forward(s, x2, xl2, base2, plan, *p[:2], scaling, temperature, *p[2:], user_scaling,
                      y=base2 if in_place else None)
    return y, side


@torch.library.custom_op("proper::triton_linear_fwd", mutates_args=())
def _fwd_op(
    x: Tensor, x_lora: Tensor, base_out: Tensor, plan: Tensor, lora_A: Tensor, lora_B: Tensor,
    router_x: Optional[Tensor], router_user: Optional[Tensor], router_h: Optional[Tensor],
    user_A: Optional[Tensor], user_B: Optional[Tensor],
    scaling: float, top_k: int, temperature: float, user_scaling: float, same_x: bool, max_runs: int, strategy: str,
    compact: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, logits fp32, gates fp32, indices, h, g*h, h_u, schedule): y shaped like base_out.

    plan: a BatchPlan's table [6, T]; max_runs: its bound on the runs; compact: the
    backward gives the bank and the user router sparse gradients."""
    y, side = _run_forward(x, x_lora, base_out, plan, lora_A, lora_B, router_x, router_user, router_h, user_A,
                           user_B, scaling, top_k, temperature, user_scaling, same_x, strategy, False)
    return (y.reshape(base_out.shape),) + side[3:6] + side[:3] + (side[6],)


@_fwd_op.register_fake
def _(x, x_lora, base_out, plan, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
      scaling, top_k, temperature, user_scaling, same_x, max_runs, strategy, compact):
    s = _call_of(x, lora_A, lora_B, top_k, user_A, strategy)
    rows, width = _side_widths(s)
    f32 = dict(dtype=torch.float32)
    return (
        base_out.new_empty(base_out.shape), x.new_empty(s.T, s.E, **f32), x.new_empty(s.T, top_k, **f32),
        x.new_empty(s.T, top_k, dtype=torch.long), x.new_empty(rows, width, **f32),
        x.new_empty(rows, width), x.new_empty(s.T, max(s.RU, 1), **f32),
        x.new_empty(_meta_len(s), dtype=torch.long),
    )


@torch.library.custom_op("proper::triton_linear_fwd_", mutates_args=("base_out",))
def _fwd_inplace_op(
    x: Tensor, x_lora: Tensor, base_out: Tensor, plan: Tensor, lora_A: Tensor, lora_B: Tensor,
    router_x: Optional[Tensor], router_user: Optional[Tensor], router_h: Optional[Tensor],
    user_A: Optional[Tensor], user_B: Optional[Tensor],
    scaling: float, top_k: int, temperature: float, user_scaling: float, same_x: bool, strategy: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Inference: the adapters are added into base_out's own memory (vLLM's add_inputs).
    Returns (logits fp32, gates fp32, indices)."""
    y, side = _run_forward(x, x_lora, base_out, plan, lora_A, lora_B, router_x, router_user, router_h, user_A,
                           user_B, scaling, top_k, temperature, user_scaling, same_x, strategy, True)
    if y.data_ptr() != base_out.data_ptr():  # base_out was not contiguous: copy back
        base_out.copy_(y.reshape(base_out.shape))
    return side[3], side[4], side[5]


@_fwd_inplace_op.register_fake
def _(x, x_lora, base_out, plan, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
      scaling, top_k, temperature, user_scaling, same_x, strategy):
    T = plan.shape[1]
    f32 = dict(dtype=torch.float32)
    return (x.new_empty(T, lora_A.shape[0], **f32), x.new_empty(T, top_k, **f32),
            x.new_empty(T, top_k, dtype=torch.long))


@torch.library.custom_op("proper::triton_linear_bwd", mutates_args=())
def _bwd_op(
    dy: Tensor, dgates: Optional[Tensor], dlogits: Optional[Tensor], x: Tensor, x_lora: Tensor, plan: Tensor,
    lora_A: Tensor, lora_B: Tensor, router_x: Optional[Tensor], router_user: Optional[Tensor],
    router_h: Optional[Tensor], user_A: Optional[Tensor], user_B: Optional[Tensor],
    logits: Tensor, gates: Tensor, idx: Tensor, h: Tensor, hg: Tensor, hu: Tensor, meta: Tensor,
    scaling: float, top_k: int, temperature: float, user_scaling: float, same_x: bool, max_runs: int, strategy: str,
    needs: list[bool], compact: bool,
) -> list[Tensor]:
    """Gradients in the order of _GRAD_NAMES (an empty tensor: no gradient), then, with
    compact, the user router's rows. compact: the bank's gradients as [max_runs, ...] values
    (rows: the plan's run users) and the user router's as [T, E] values."""
    s = _call_of(x, lora_A, lora_B, top_k, user_A, strategy)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    xl2 = x2 if same_x else x_lora.reshape(-1, x.shape[-1]).contiguous()
    p = _contiguous(lora_A, lora_B, router_x, router_user, router_h, user_A, user_B)
    g = backward(
        s, dy.reshape(-1, dy.shape[-1]), dgates, dlogits, (h, hg, hu, logits, gates, idx, meta), x2, xl2, plan,
        max_runs, *p[:2], scaling, temperature, *p[2:], user_scaling, dict(zip(_GRAD_NAMES[2:], needs)), compact,
    )
    rows = x.new_empty(0, dtype=torch.long)
    if compact and isinstance(g.get("router_user"), tuple):
        rows, g["router_user"] = g["router_user"]
    out = [x.new_empty(0) if g.get(n) is None else g[n].reshape(x.shape) if n in ("x", "x_lora") else g[n]
           for n in _GRAD_NAMES]
    return out + [rows]


def _grad_present(name, same_x, router_x, has_u, router_user, router_h, needs, scaling):
    if name == "x":
        return same_x or router_x is not None
    if name == "x_lora":
        return not same_x
    need = dict(zip(_GRAD_NAMES[2:], needs))[name]
    present = dict(lora_A=scaling != 0.0, lora_B=scaling != 0.0, router_x=router_x is not None,
                   router_user=router_user is not None, router_h=router_h is not None and has_u,
                   user_A=has_u, user_B=has_u)[name]
    return need and present


@_bwd_op.register_fake
def _(dy, dgates, dlogits, x, x_lora, plan, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
      logits, gates, idx, h, hg, hu, meta, scaling, top_k, temperature, user_scaling, same_x, max_runs, strategy,
      needs, compact):
    has_u = user_A is not None and user_A.shape[1] > 0
    like = dict(x=x, x_lora=x, lora_A=lora_A, lora_B=lora_B, router_x=router_x, router_user=router_user,
                router_h=router_h, user_A=user_A, user_B=user_B)
    out = []
    for n in _GRAD_NAMES:
        if not _grad_present(n, same_x, router_x, has_u, router_user, router_h, needs, scaling):
            out.append(x.new_empty(0))
        elif compact and n in ("user_A", "user_B"):
            out.append(like[n].new_empty((max_runs,) + tuple(like[n].shape[1:])))
        elif compact and n == "router_user":
            out.append(router_user.new_empty(plan.shape[1], router_user.shape[1]))
        else:
            out.append(torch.empty_like(like[n]))
    rows_present = compact and _grad_present("router_user", same_x, router_x, has_u, router_user, router_h, needs,
                                             scaling)
    out.append(x.new_empty(plan.shape[1] if rows_present else 0, dtype=torch.long))
    return out


def _setup_context(ctx, inputs, output):
    (x, x_lora, base_out, plan, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
     scaling, top_k, temperature, user_scaling, same_x, max_runs, strategy, compact) = inputs
    _, logits, gates, idx, h, hg, hu, meta = output
    ctx.save_for_backward(x, x_lora, plan, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
                          logits, gates, idx, h, hg, hu, meta)
    ctx.consts = (scaling, top_k, temperature, user_scaling, same_x, max_runs, strategy)
    ctx.sparse = compact
    ctx.shapes = (None if router_user is None else router_user.shape, None if user_A is None else user_A.shape,
                  None if user_B is None else user_B.shape)
    ctx.mark_non_differentiable(idx, h, hg, hu, meta)


def _backward(ctx, dy, dlogits, dgates, *_unused):
    saved = ctx.saved_tensors
    x = saved[0]
    scaling, top_k, temperature, user_scaling, same_x, max_runs, strategy = ctx.consts
    compact = ctx.sparse
    needs = list(ctx.needs_input_grad[4:11])
    grads = _bwd_op(dy, dgates, dlogits, *saved[:3], *saved[3:], scaling, top_k, temperature, user_scaling,
                    same_x, max_runs, strategy, needs, compact)
    rows = grads[-1]
    g = dict(zip(_GRAD_NAMES, grads[:-1]))
    # An empty 1-D tensor means no gradient; T = 0 gives empty gradients of x and (compact)
    # of the user router's rows, which are kept.
    g = {n: (t if t.numel() or (n in ("x", "x_lora") and t.shape == x.shape)
             or (n == "router_user" and compact and t.dim() == 2) else None) for n, t in g.items()}
    if compact:
        plan = saved[2]
        ru_shape, ua_shape, ub_shape = ctx.shapes
        users = plan[RUN_USER][:max_runs].clamp(min=0)[None]
        n = users.shape[1]  # max_runs, except for T = 0 (no runs, a bound of 1)
        if g["user_A"] is not None:
            g["user_A"] = torch.sparse_coo_tensor(users, g["user_A"][:n], ua_shape, check_invariants=False)
        if g["user_B"] is not None:
            g["user_B"] = torch.sparse_coo_tensor(users, g["user_B"][:n], ub_shape, check_invariants=False)
        if g["router_user"] is not None:
            g["router_user"] = torch.sparse_coo_tensor(rows[None], g["router_user"], ru_shape, check_invariants=False)
    dxl = None if same_x else g["x_lora"]
    dbase = dy if ctx.needs_input_grad[2] else None
    return (g["x"], dxl, dbase, None, g["lora_A"], g["lora_B"], g["router_x"], g["router_user"], g["router_h"],
            g["user_A"], g["user_B"], None, None, None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def plan_for(user_ids: Optional[Tensor], x: Tensor, user_A: Optional[Tensor], router_user: Optional[Tensor],
             plan=None) -> BatchPlan:
    """The batch plan for this call: `plan` (a BatchPlan, or a function returning one), or a
    new one built from user_ids."""
    if callable(plan):
        plan = plan()
    if plan is not None:
        return check_plan(plan, x)
    n_users = user_A.shape[0] if user_A is not None else (router_user.shape[0] - 1 if router_user is not None else None)
    return build_plan(user_ids, x.shape[:-1], x.device, n_users)


def proper_linear(x, base_out, lora_A, lora_B, scaling, *, top_k, temperature=1.0, router_x=None,
                  router_user=None, router_h=None, user_ids=None, user_A=None, user_B=None,
                  user_scaling=0.0, x_lora=None, inplace=False, sparse_grad=False, strategy=None, plan=None):
    """Same contract as proper_kernels.reference.proper_linear; the gates carry a gradient.

    strategy: "dense" | "grouped" | None (chosen from E*r by choose_strategy). plan: the
    batch's BatchPlan (or a function returning it), shared by every layer; built from
    user_ids when None. inplace: without autograd the adapters are added into base_out."""
    same_x = x_lora is None or x_lora is x
    if user_A is not None and user_A.shape[1] == 0:
        user_A = user_B = None
    if user_A is None:
        router_h = None
    if strategy is None:
        strategy = choose_strategy(lora_A.shape[0], lora_A.shape[1])
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    bp = plan_for(user_ids, x, user_A, router_user, plan)
    args = (x, x if same_x else x_lora, base_out, bp.table, lora_A, lora_B, router_x, router_user, router_h,
            user_A, user_B, float(scaling), int(top_k), float(temperature), float(user_scaling), same_x)
    params = [t for t in (x, x_lora, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B) if t is not None]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    if inplace and not grad and base_out.is_contiguous() and not base_out.requires_grad:
        logits, gates, idx = _fwd_inplace_op(*args, strategy)
        y = base_out
    else:
        y, logits, gates, idx, *_ = _fwd_op(*args, bp.max_runs, strategy, bool(sparse_grad))
    return y, Routing(logits.to(x.dtype), gates.to(x.dtype), idx)
