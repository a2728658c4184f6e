"""Forward kernels over blocks of the plan's sorted tokens, and their launchers.

Each program owns a block of sorted tokens (``proper_kernels.plan``): the runs of a few
users, so the user LoRA is one tensor-core GEMM per run against that user's rows. These
kernels are the whole dense strategy (all experts' columns, E*r up to 256, in one tile);
the grouped strategy (``triton_grouped``) runs them for the routing, the user LoRA and the
final sum into base_out, with its experts' products done per (token, slot) pair.

  _shrink  per block (and per split of the features, for few tokens): h = x_lora A_all^T
           [T, E*r], logits = x W_x^T, h_u = A^u x_lora per run; with one split it
           finishes the routing (R[u], W_h h_u, softmax, top-k) and stores h, g*h, h_u,
           logits, gates and indices; with several it stores partial sums for _route.
  _route   sums the split-K partials and routes (decode: the shrink then covers every SM).
  _expand  per (block, out tile): y = base_out + s_g (g*h) B_all + s_u h_u B^u (per run),
           in base_out's dtype, into base_out's own memory when in place.

x, x_lora, base_out and y are read and written through their strides (any 2-D layout, no
copy); the weights and the side buffers are contiguous. Launch configurations come from
the call (``triton_call.Call``), which reads them from ``proper_kernels.launch``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import launch as _launch
from .triton_blocks import at, block_tokens, dot_f32, gate_columns, nbytes
from .triton_utils import softmax_rows, topk_select


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
        logits += dot_f32(hu, wh.to(DT), DT, PREC)
    p = softmax_rows(logits, col, E, inv_temperature)
    idx, gates = topk_select(p, col, kcol, E, EP, TOP_K)
    if SHRINK:
        gc = gate_columns(idx, gates, kcol, c, BLOCK_T, ERP, R, E * R, TOP_K)
        tc = tmask[:, None] & (c < E * R)[None, :]
        tl.store(h_ptr + tok[:, None] * (E * R) + c[None, :], h, mask=tc)
        tl.store(hg_ptr + tok[:, None] * (E * R) + c[None, :], (h * gc).to(hg_ptr.dtype.element_ty), mask=tc)
    if HAS_U:
        tl.store(hu_ptr + tok[:, None] * RU + j[None, :], hu, mask=tmask[:, None] & (j < RU)[None, :])
    tl.store(logit_ptr + tok[:, None] * E + col[None, :], logits, mask=tmask[:, None] & (col < E)[None, :])
    tk = tmask[:, None] & (kcol < TOP_K)[None, :]
    tl.store(gate_ptr + tok[:, None] * TOP_K + kcol[None, :], gates, mask=tk)
    tl.store(idx_ptr + tok[:, None] * TOP_K + kcol[None, :], idx.to(tl.int64), mask=tk)


@triton.jit
def _shrink(
    x_ptr, xl_ptr, order_ptr, run_ptr, run_user_ptr, uid_ptr, a_ptr, wx_ptr, ua_ptr, r_ptr, wh_ptr,
    h_ptr, hg_ptr, hu_ptr, logit_ptr, gate_ptr, idx_ptr,
    T, default_row, inv_temperature, sx_t, sx_k, sxl_t, sxl_k,
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
    pos, pmask, tok, prun, r_first, r_last = block_tokens(order_ptr, run_ptr, T, BLOCK_T)
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
        xl = tl.load(xl_ptr + at(tok, k, sxl_t, sxl_k), mask=xm, other=0.0).to(DT)
        if SHRINK:
            a = tl.load(a_ptr + c[None, :] * IN + k[:, None], mask=(c < E * R)[None, :] & kmask[:, None], other=0.0)
            h = tl.dot(xl, a.to(DT), h, input_precision=PREC)
        if HAS_WX:
            if SAME_X:
                xr = xl
            else:
                xr = tl.load(x_ptr + at(tok, k, sx_t, sx_k), mask=xm, other=0.0).to(DT)
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
    T, scaling, user_scaling, sb_t, sb_o, sy_t, sy_o,
    OUT: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RU: tl.constexpr,
    ERP: tl.constexpr, RUP: tl.constexpr, HAS_U: tl.constexpr, DENSE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """DENSE=False (grouped strategy): the experts' sum arrives in extra [T, OUT] fp32.
    y may be base_out itself (each element is read, then written, by one program)."""
    pos, pmask, tok, prun, r_first, r_last = block_tokens(order_ptr, run_ptr, T, BLOCK_T)
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
    base = tl.load(base_ptr + at(tok, o, sb_t, sb_o), mask=tom, other=0.0).to(tl.float32)
    tl.store(y_ptr + at(tok, o, sy_t, sy_o), (base + acc).to(y_ptr.dtype.element_ty), mask=tom)


# -- launchers ------------------------------------------------------------------------------


def shrink(s, x2, xl2, table, lora_A, router_x, user_A, router_user, router_h, outs, temperature, default_row: int,
           bank: int, written: int) -> None:
    """The shrink (and, with one split, the routing) into outs = (h or its partials, g*h,
    h_u or partials, logits or partials, gates, indices). table: the plan's (uid, order,
    run, run_user) rows; default_row: the user router's row of tokens without one; bank:
    the bytes of the user_A rows read; written: the bytes it writes (for the records)."""
    T, has_u = s.T, s.RU > 0
    uid, order, run, run_user = table
    dummy = x2
    has_wx, has_r, has_wh = router_x is not None, router_user is not None, router_h is not None and has_u
    same_x = xl2 is x2
    bt, bk, warps, stages = s.shrink
    read = nbytes(xl2, None if same_x else x2, lora_A if s.dense else None, router_x) + bank \
        + (nbytes(router_h) if s.split == 1 else 0)
    flops = 2 * T * s.IN * ((s.ER if s.dense else 0) + (s.E if has_wx else 0) + s.RU)
    _launch.launch(
        _shrink, (triton.cdiv(T, bt), s.split),
        (x2, xl2, order, run, run_user, uid, lora_A, router_x if has_wx else dummy,
         user_A if has_u else dummy, router_user if has_r else dummy, router_h if has_wh else dummy,
         *outs, T, default_row, 1.0 / temperature, *x2.stride(), *xl2.stride()),
        dict(IN=s.IN, TOP_K=s.TOP_K, EP=s.EP, KP=s.KP, HAS_WX=has_wx, SAME_X=same_x, BLOCK_T=bt, BLOCK_K=bk,
             HAS_R=has_r, HAS_WH=has_wh, HAS_U=has_u, SHRINK=s.dense, SPLIT=s.split, **s.consts()),
        warps, stages, bytes=read + written, flops=flops,
        note="shrink + route" if s.split == 1 else "shrink (split-K)",
    )


def route(s, partials, uid, has_wx: bool, router_user, router_h, outs, temperature, default_row: int, written: int,
          routed: int) -> None:
    """Sum the shrink's split-K partials (h, logits, h_u) and route into outs = (h, g*h,
    h_u, logits, gates, indices); written / routed: the bytes of the partials / of outs."""
    has_u = s.RU > 0
    dummy = outs[1]  # g*h: x's dtype, as every placeholder pointer
    has_r, has_wh = router_user is not None, router_h is not None and has_u
    bt, _, warps, stages = s.route
    _launch.launch(
        _route, (triton.cdiv(s.T, bt),),
        (*partials, uid, router_user if has_r else dummy, router_h if has_wh else dummy,
         *outs, s.T, default_row, 1.0 / temperature),
        dict(E=s.E, R=s.R, RU=s.RU, TOP_K=s.TOP_K, EP=s.EP, ERP=s.ERP, RUP=s.RUP, KP=s.KP,
             HAS_WX=has_wx, HAS_R=has_r, HAS_WH=has_wh, HAS_U=has_u, SHRINK=s.dense, SPLIT=s.split,
             BLOCK_T=bt, DT=s.DT, PREC=s.PREC),
        warps, stages, bytes=written + routed + nbytes(router_h), note="route (sum split-K partials)",
    )


def expand(s, gh, hu, table, lora_B, user_B, base2, extra, y, scaling, user_scaling, bank: int) -> None:
    """y = base_out + the experts' term + the user term. gh: g*h in the dense [T, E*r]
    layout (dense strategy, grouped wide); else `extra` [T, out] fp32 holds the experts'
    sum. y may be base2 itself. bank: the bytes of the user_B rows read."""
    _, order, run, run_user = table
    has_u = s.RU > 0
    dense_in = s.dense or s.wide
    bt, bn, warps, stages = s.expand
    _launch.launch(
        _expand, (triton.cdiv(s.T, bt), triton.cdiv(s.OUT, bn)),
        (gh, hu, order, run, run_user, lora_B, user_B if has_u else gh, base2, extra, y, s.T, scaling, user_scaling,
         *base2.stride(), *y.stride()),
        dict(s.consts(), ERP=s.ERX, OUT=s.OUT, HAS_U=has_u, DENSE=dense_in, BLOCK_T=bt, BLOCK_N=bn, BLOCK_C=s.BLOCK_C),
        warps, stages,
        bytes=nbytes(base2, y, lora_B if dense_in else extra) + bank + (nbytes(gh) if dense_in else 0)
        + (nbytes(hu) if has_u else 0),
        flops=2 * s.T * s.OUT * ((s.ER if dense_in else 0) + s.RU), note="expand (adds into base_out)",
    )
