"""Backward kernels over blocks of the plan's sorted tokens, and their launchers.

The dense strategy's whole backward; the grouped strategy (``triton_grouped``) runs the
router backward, the user LoRA and dx here too, with its experts' products per pair.

  _bwd_dh    per block: d(g*h) = s_g dy B_all, dh_u = s_u dy B^u (per run), the router
             backward (d gates, from the products and from the gates' own gradient, to
             d logits), dh = g d(g*h), dh_u += d logits W_h.
  _bwd_dx    per (block, in tile): dx = dh A_all + d logits W_x + dh_u A^u (per run).
  _wgrad_in  per tile of x's features, streamed over the sorted tokens: lora_A's and
             router_x's gradients, and each user's user_A row when the user's run ends
             (rows of the users present, or compact rows for sparse gradients).
  _wgrad_out the same over dy: lora_B's, and each user's user_B row.
So x and dy are each read once more for all the weight gradients. dy, x_lora and the
gradients of the gates and logits that arrive from outside are read through their strides.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import launch as _launch
from .triton_blocks import at, bank_bytes, bank_row, block_tokens, dot_f32, gate_columns, nbytes, runs
from .triton_utils import slot, softmax_rows, topk_backward


@triton.jit
def _bwd_dh(
    dy_ptr, order_ptr, run_ptr, run_user_ptr, uid_ptr, b_ptr, ub_ptr, wh_ptr, h_ptr, logit_ptr, gate_ptr, idx_ptr,
    dlext_ptr, dgext_ptr, dslot_ptr, dcat_ptr, dlogit_ptr, dhu_ptr,
    T, scaling, user_scaling, inv_temperature, sdy_t, sdy_o, sdl_t, sdl_e, sdg_t, sdg_k,
    OUT: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RU: tl.constexpr, TOP_K: tl.constexpr,
    EP: tl.constexpr, ERP: tl.constexpr, RUP: tl.constexpr, KP: tl.constexpr, CW: tl.constexpr, LOFF: tl.constexpr,
    HAS_WH: tl.constexpr, HAS_U: tl.constexpr, HAS_DLEXT: tl.constexpr, HAS_DGEXT: tl.constexpr,
    DENSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """dcat [T, CW] (input dtype) gets dh in columns [0, E*r) (dense) and d logits in
    [LOFF, LOFF + E); d logits also go to dlogit [T, E] fp32. DENSE=False (grouped strategy):
    the experts' d gate per (token, slot) arrives in dslot [T, k]."""
    pos, pmask, tok, prun, r_first, r_last = block_tokens(order_ptr, run_ptr, T, BLOCK_T)
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
        dy = tl.load(dy_ptr + at(tok, o, sdy_t, sdy_o), mask=pmask[:, None] & omask[None, :], other=0.0).to(DT)
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
            d += tl.load(dgext_ptr + tok * sdg_t + s * sdg_k, mask=pmask, other=0.0).to(tl.float32)
        kept = tl.where(col[None, :] == sel[:, None], 1.0, kept)
        dgate = tl.where(col[None, :] == sel[:, None], d[:, None], dgate)
    p = softmax_rows(logits, col, E, inv_temperature)
    dlogits = topk_backward(p, kept, dgate, inv_temperature)
    if HAS_DLEXT:
        dlogits += tl.load(dlext_ptr + at(tok, col, sdl_t, sdl_e), mask=te, other=0.0).to(tl.float32)
    dlogits = tl.where(te, dlogits, 0.0)
    if HAS_WH:  # dh_u += d logits W_h
        wh = tl.load(wh_ptr + col[:, None] * RU + j[None, :], mask=(col < E)[:, None] & (j < RU)[None, :], other=0.0)
        dhu += dot_f32(dlogits, wh.to(DT), DT, PREC)

    if DENSE:
        gates = tl.load(gate_ptr + tok[:, None] * TOP_K + kcol[None, :], mask=tk, other=0.0)
        gc = gate_columns(idx, gates, kcol, c, BLOCK_T, ERP, R, E * R, TOP_K)
        tl.store(dcat_ptr + tok[:, None] * CW + c[None, :], (dhg * gc).to(dcat_ptr.dtype.element_ty),
                 mask=pmask[:, None] & cmask[None, :])
    tl.store(dcat_ptr + tok[:, None] * CW + LOFF + col[None, :], dlogits.to(dcat_ptr.dtype.element_ty), mask=te)
    tl.store(dlogit_ptr + tok[:, None] * E + col[None, :], dlogits, mask=te)
    if HAS_U:
        uid = tl.load(uid_ptr + tok, mask=pmask, other=-1)
        tl.store(dhu_ptr + tok[:, None] * RU + j[None, :], tl.where((uid >= 0)[:, None], dhu, 0.0),
                 mask=pmask[:, None] & (j < RU)[None, :])


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
    pos, pmask, tok, prun, r_first, r_last = block_tokens(order_ptr, run_ptr, T, BLOCK_T)
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
    dcat_ptr, dhu_ptr, x_ptr, order_ptr, run_ptr, run_user_ptr, run_end_ptr, ga_ptr, gwx_ptr, gua_ptr, T, sx_t, sx_k,
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
        xt = tl.load(x_ptr + at(tok, k, sx_t, sx_k), mask=pm[:, None] & kmask[None, :], other=0.0).to(DT)
        if DO_A:
            dh = tl.load(dcat_ptr + tok[:, None] * CW + c[None, :], mask=pm[:, None] & (c < E * R)[None, :], other=0.0)
            acc_a = tl.dot(tl.trans(dh.to(DT)), xt, acc_a, input_precision=PREC)
        if DO_WX:
            dl = tl.load(dcat_ptr + tok[:, None] * CW + LOFF + col[None, :], mask=pm[:, None] & (col < E)[None, :],
                         other=0.0)
            acc_l = tl.dot(tl.trans(dl.to(DT)), xt, acc_l, input_precision=PREC)
        if DO_U:
            prun, r_first, r_last = runs(run_ptr, p0, pos, pm, T, BLOCK_P)
            dhu = tl.load(dhu_ptr + tok[:, None] * RU + j[None, :], mask=pm[:, None] & (j < RU)[None, :], other=0.0)
            for rr in range(r_first, r_last + 1):
                dm = tl.where((prun == rr)[:, None], dhu, 0.0)
                acc_u = tl.dot(tl.trans(dm.to(DT)), xt, acc_u, input_precision=PREC)
                if tl.load(run_end_ptr + rr) <= p0 + BLOCK_P:  # the run ends here: its row is whole
                    u, row = bank_row(run_user_ptr, rr, COMPACT)
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
    sdy_t, sdy_o,
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
        dyt = tl.trans(tl.load(dy_ptr + at(tok, o, sdy_t, sdy_o), mask=pm[:, None] & omask[None, :],
                               other=0.0).to(DT))
        if DO_B:
            hg = tl.load(hg_ptr + tok[:, None] * (E * R) + c[None, :], mask=pm[:, None] & (c < E * R)[None, :], other=0.0)
            acc_b = tl.dot(dyt, hg.to(DT), acc_b, input_precision=PREC)
        if DO_U:
            prun, r_first, r_last = runs(run_ptr, p0, pos, pm, T, BLOCK_P)
            hu = tl.load(hu_ptr + tok[:, None] * RU + j[None, :], mask=pm[:, None] & (j < RU)[None, :], other=0.0)
            for rr in range(r_first, r_last + 1):
                hm = tl.where((prun == rr)[:, None], hu, 0.0)
                acc_u = tl.dot(dyt, hm.to(DT), acc_u, input_precision=PREC)
                if tl.load(run_end_ptr + rr) <= p0 + BLOCK_P:  # the run ends here: its row is whole
                    u, row = bank_row(run_user_ptr, rr, COMPACT)
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


def _strides(t):
    return t.stride() if t is not None else (0, 0)


def bwd_dh(s, dy2, table, lora_B, user_B, router_h, h, logits, gates, idx, dlext, dgates, dslot, dcat, dlogits,
           dhu, scaling, user_scaling, temperature, bank_rows, dummy) -> None:
    """d h (dense), d logits and d h_u into dcat, dlogits, dhu. dlext / dgates: gradients of
    the logits and gates from outside (None: none); dslot: the grouped strategy's d gate per
    (token, slot); bank_rows: the bank rows the batch reads (for the records)."""
    uid, order, run, run_user = table
    has_u = s.RU > 0
    has_wh = router_h is not None and has_u
    bt, bn, warps, stages = s.bwd_dh
    _launch.launch(
        _bwd_dh, (triton.cdiv(s.T, bt),),
        (dy2, order, run, run_user, uid, lora_B, user_B if has_u else dummy, router_h if has_wh else dummy,
         h, logits, gates, idx, dlext if dlext is not None else dummy, dgates if dgates is not None else dummy,
         dslot, dcat, dlogits, dhu, s.T, scaling, user_scaling, 1.0 / temperature,
         *dy2.stride(), *_strides(dlext), *_strides(dgates)),
        dict(OUT=s.OUT, TOP_K=s.TOP_K, EP=s.EP, KP=s.KP, CW=s.CW, LOFF=s.LOFF, HAS_WH=has_wh, HAS_U=has_u,
             HAS_DLEXT=dlext is not None, HAS_DGEXT=dgates is not None, DENSE=s.dense, BLOCK_T=bt, BLOCK_N=bn,
             **s.consts()),
        warps, stages,
        bytes=nbytes(dy2, lora_B if s.dense else None, dcat, dlogits, dhu, logits, gates, idx)
        + (nbytes(h) if s.dense else 0) + (bank_bytes(user_B, bank_rows) if has_u else 0),
        flops=2 * s.T * s.OUT * ((s.ER if s.dense else 0) + s.RU), note="backward: d h, d logits, d h_u",
    )


def bwd_dx(s, dcat, dhu, table, lora_A, user_A, router_x, extra, dxl, dx, same_x, bank_rows, dummy) -> None:
    """dx_lora (and dx, when x and x_lora differ and the token router reads x) from dcat and
    dhu; `extra` [T, in] fp32: the grouped atomic path's experts' part."""
    _, order, run, run_user = table
    has_u, has_wx = s.RU > 0, router_x is not None
    dense_in = s.dense or s.wide
    bt, bk, warps, stages = s.bwd_dx
    _launch.launch(
        _bwd_dx, (triton.cdiv(s.T, bt), triton.cdiv(s.IN, bk)),
        (dcat, dhu, order, run, run_user, lora_A, user_A if has_u else dummy, router_x if has_wx else dummy,
         extra, dxl, dx, s.T),
        dict(s.consts(), ERP=s.ERX, IN=s.IN, EP=s.EP, CW=s.CW, LOFF=s.LOFF, HAS_WX=has_wx, HAS_U=has_u,
             SAME_X=same_x, DENSE=dense_in, BLOCK_T=bt, BLOCK_K=bk, BLOCK_C=s.BLOCK_C),
        warps, stages,
        bytes=nbytes(dcat, dxl, None if dx is dxl else dx, lora_A if dense_in else extra, router_x)
        + (nbytes(dhu) + bank_bytes(user_A, bank_rows) if has_u else 0),
        flops=2 * s.T * s.IN * ((s.ER if dense_in else 0) + (s.E if has_wx else 0) + s.RU), note="backward: dx",
    )


def wgrad_in(s, dcat, dhu, xl2, table, run_end, ga, gwx, gua, do_a, do_wx, do_u, compact, bank_rows) -> None:
    """lora_A's, router_x's and the user_A rows' gradients in one pass over x_lora (the
    ones not asked for get a placeholder pointer)."""
    _, order, run, run_user = table
    bp, bk, warps, stages = s.wgrad_in
    _launch.launch(
        _wgrad_in, (triton.cdiv(s.IN, bk),),
        (dcat, dhu, xl2, order, run, run_user, run_end, ga, gwx, gua, s.T, *xl2.stride()),
        dict(IN=s.IN, E=s.E, R=s.R, RU=s.RU, EP=s.EP, ERP=s.ERP, RUP=s.RUP, CW=s.CW,
             LOFF=s.LOFF, DO_A=do_a, DO_WX=do_wx, DO_U=do_u, COMPACT=compact,
             BLOCK_P=bp, BLOCK_K=bk, DT=s.DT, PREC=s.PREC),
        warps, stages, bytes=nbytes(xl2, dcat, dhu if do_u else None, ga if do_a else None, gwx if do_wx else None)
        + (bank_bytes(gua, bank_rows) if do_u else 0),
        flops=2 * s.T * s.IN * ((s.ER if do_a else 0) + (s.E if do_wx else 0) + (s.RU if do_u else 0)),
        note="weight gradients over x (lora_A, router_x, user_A)",
    )


def wgrad_out(s, dy2, hg, hu, table, run_end, gb, gub, do_b, do_u, compact, scaling, user_scaling,
              bank_rows) -> None:
    """lora_B's and the user_B rows' gradients in one pass over dy."""
    _, order, run, run_user = table
    bp, bm, warps, stages = s.wgrad_out
    _launch.launch(
        _wgrad_out, (triton.cdiv(s.OUT, bm),),
        (dy2, hg, hu, order, run, run_user, run_end, gb, gub, s.T, scaling, user_scaling, *dy2.stride()),
        dict(OUT=s.OUT, E=s.E, R=s.R, RU=s.RU, ERP=s.ERP, RUP=s.RUP, DO_B=do_b, DO_U=do_u, COMPACT=compact,
             BLOCK_P=bp, BLOCK_M=bm, DT=s.DT, PREC=s.PREC),
        warps, stages, bytes=nbytes(dy2, hg if do_b else None, hu if do_u else None, gb if do_b else None)
        + (bank_bytes(gub, bank_rows) if do_u else 0),
        flops=2 * s.T * s.OUT * ((s.ER if do_b else 0) + (s.RU if do_u else 0)),
        note="weight gradients over dy (lora_B, user_B)",
    )
