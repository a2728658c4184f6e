"""The fused ProperLinear pass in Triton: router, top-k, gated expert LoRAs and user LoRA.

Dense-masked strategy (SPEC.md "Kernels"): every expert's shrink is computed in the same
K-loop as the router logits and masked by the gates, so no token sort is needed. It suits
small E*r (up to 256 columns in one tile).

Forward, two launches:
  1. shrink + route, one program per block of tokens: h = x_lora A_all^T [T, E*r],
     logits = x W_x^T + R[u] + h_u W_h^T with h_u = A^u x_lora, softmax, top-k, gates;
     stores h, the gated h, h_u, logits, gates and indices (fp32 side outputs).
  2. expand, one program per (token block, out block): y = base_out + s_g (g*h) B_all
     + s_u B^u h_u.
Backward, two launches plus dense GEMMs:
  1. per token block: d(g*h) = s_g dy B_all, dh_u = s_u dy B^u, the router backward
     (d gates -> d logits), dh = g * d(g*h), dh_u += d logits W_h.
  2. per (token block, in block): dx = dh A_all + d logits W_x + dh_u A^u.
  Weight gradients are plain GEMMs over tokens (torch.matmul) and, for the user bank,
  per-sequence batched GEMMs scattered to the rows of the users present.

Every load is upcast to fp32 before arithmetic; dots run on tensor cores in tf32 for
16-bit inputs (exact for their products) and in IEEE fp32 for fp32 inputs unless
``torch.backends.cuda.matmul.allow_tf32`` is set.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_grouped
from ._common import router_and_bank_grads, token_user_ids
from .reference import Routing
from .triton_utils import softmax_rows, topk_backward, topk_select

# Largest E*r the dense strategy holds in one tile.
DENSE_MAX_COLUMNS = 256


def _empty(*shape, device, dtype) -> Tensor:
    """Every output and side buffer comes from here (tests poison it to catch unwritten
    elements)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Launch configurations keyed by the padded expert columns (E*r); the interpreter prefers
# fewer, larger programs.
_DENSE_CONFIGS = {
    # ERP: (BLOCK_T, BLOCK_K, BLOCK_N, num_warps)
    16: (64, 64, 64, 4),
    32: (64, 64, 64, 4),
    64: (32, 64, 64, 4),
    128: (32, 32, 64, 4),
    256: (16, 32, 64, 8),
}
_INTERPRETER_CONFIG = (64, 64, 64, 1)


def _config(erp: int) -> tuple[int, int, int, int]:
    if _interpreting():
        return _INTERPRETER_CONFIG
    return _DENSE_CONFIGS[erp]


def _precision(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "tf32"
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@triton.jit
def _expand_onehot(E: tl.constexpr, R: tl.constexpr, EP: tl.constexpr, ERP: tl.constexpr):
    """[EP, ERP] 0/1 matrix: row e has ones on expert e's r columns."""
    e = tl.arange(0, EP)
    c = tl.arange(0, ERP)
    return ((c[None, :] // R) == e[:, None]) & (c[None, :] < E * R)


@triton.jit
def _fwd_shrink_route(
    x_ptr, xl_ptr, uid_ptr, a_ptr, wx_ptr, r_ptr, wh_ptr, ua_ptr,
    h_ptr, hg_ptr, hu_ptr, logit_ptr, gate_ptr, idx_ptr,
    T, default_row, inv_temperature,
    IN: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RU: tl.constexpr, TOP_K: tl.constexpr,
    EP: tl.constexpr, ERP: tl.constexpr, RUP: tl.constexpr, KP: tl.constexpr,
    HAS_WX: tl.constexpr, HAS_R: tl.constexpr, HAS_WH: tl.constexpr, HAS_U: tl.constexpr,
    SAME_X: tl.constexpr, SHRINK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    """SHRINK=False (grouped strategy): route only, the experts' shrink runs elsewhere."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    col = tl.arange(0, EP)
    c = tl.arange(0, ERP)
    j = tl.arange(0, RUP)
    kcol = tl.arange(0, KP)
    uid = tl.load(uid_ptr + t, mask=tmask, other=-1)
    has_row = tmask & (uid >= 0)
    row = tl.where(has_row, uid, 0)

    h = tl.zeros((BLOCK_T, ERP), dtype=tl.float32)
    logits = tl.zeros((BLOCK_T, EP), dtype=tl.float32)
    hu = tl.zeros((BLOCK_T, RUP), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < IN
        xm = tmask[:, None] & kmask[None, :]
        xl = tl.load(xl_ptr + t[:, None] * IN + k[None, :], mask=xm, other=0.0).to(tl.float32)
        if SHRINK:
            a = tl.load(a_ptr + c[None, :] * IN + k[:, None], mask=(c < E * R)[None, :] & kmask[:, None], other=0.0)
            h = tl.dot(xl, a.to(tl.float32), h, input_precision=PREC)
        if HAS_WX:
            if SAME_X:
                xr = xl
            else:
                xr = tl.load(x_ptr + t[:, None] * IN + k[None, :], mask=xm, other=0.0).to(tl.float32)
            w = tl.load(wx_ptr + col[None, :] * IN + k[:, None], mask=(col < E)[None, :] & kmask[:, None], other=0.0)
            logits = tl.dot(xr, w.to(tl.float32), logits, input_precision=PREC)
        if HAS_U:
            ua = tl.load(
                ua_ptr + row[:, None, None] * (RU * IN) + j[None, :, None] * IN + k[None, None, :],
                mask=has_row[:, None, None] & (j < RU)[None, :, None] & kmask[None, None, :],
                other=0.0,
            ).to(tl.float32)
            hu += tl.sum(xl[:, None, :] * ua, axis=2)

    if HAS_R:
        rrow = tl.where(has_row, uid, default_row)
        logits += tl.load(r_ptr + rrow[:, None] * E + col[None, :], mask=tmask[:, None] & (col < E)[None, :], other=0.0).to(tl.float32)
    if HAS_WH:
        wh = tl.load(wh_ptr + col[:, None] * RU + j[None, :], mask=(col < E)[:, None] & (j < RU)[None, :], other=0.0).to(tl.float32)
        logits += tl.sum(hu[:, None, :] * wh[None, :, :], axis=2)

    p = softmax_rows(logits, col, E, inv_temperature)
    idx, gates, dense = topk_select(p, col, kcol, E, EP, TOP_K)
    if SHRINK:
        onehot = _expand_onehot(E, R, EP, ERP).to(tl.float32)
        gate_cols = tl.dot(dense, onehot, input_precision="ieee")
        tc = tmask[:, None] & (c < E * R)[None, :]
        tl.store(h_ptr + t[:, None] * (E * R) + c[None, :], h, mask=tc)
        tl.store(hg_ptr + t[:, None] * (E * R) + c[None, :], h * gate_cols, mask=tc)
    if HAS_U:
        tl.store(hu_ptr + t[:, None] * RU + j[None, :], hu, mask=tmask[:, None] & (j < RU)[None, :])
    te = tmask[:, None] & (col < E)[None, :]
    tl.store(logit_ptr + t[:, None] * E + col[None, :], logits, mask=te)
    tk = tmask[:, None] & (kcol < TOP_K)[None, :]
    tl.store(gate_ptr + t[:, None] * TOP_K + kcol[None, :], gates, mask=tk)
    tl.store(idx_ptr + t[:, None] * TOP_K + kcol[None, :], idx.to(tl.int64), mask=tk)


@triton.jit
def _fwd_expand(
    hg_ptr, hu_ptr, uid_ptr, b_ptr, ub_ptr, base_ptr, extra_ptr, y_ptr,
    T, scaling, user_scaling,
    OUT: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RU: tl.constexpr,
    ERP: tl.constexpr, RUP: tl.constexpr, HAS_U: tl.constexpr, DENSE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """DENSE=False (grouped strategy): the experts' sum arrives in extra [T, OUT] fp32."""
    pid_t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tmask = t < T
    omask = o < OUT
    c = tl.arange(0, ERP)
    cmask = c < E * R
    tom = tmask[:, None] & omask[None, :]
    if DENSE:
        hg = tl.load(hg_ptr + t[:, None] * (E * R) + c[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
        # B [E, out, r] read as B_all^T [E*r, out]: column c = (e, i) sits at e*out*r + i.
        boff = (c // R) * (OUT * R) + (c % R)
        b = tl.load(b_ptr + boff[:, None] + o[None, :] * R, mask=cmask[:, None] & omask[None, :], other=0.0)
        acc = tl.dot(hg, b.to(tl.float32), input_precision=PREC) * scaling
    else:
        acc = tl.load(extra_ptr + t[:, None] * OUT + o[None, :], mask=tom, other=0.0)
    if HAS_U:
        j = tl.arange(0, RUP)
        uid = tl.load(uid_ptr + t, mask=tmask, other=-1)
        has_row = tmask & (uid >= 0)
        row = tl.where(has_row, uid, 0)
        hu = tl.load(hu_ptr + t[:, None] * RU + j[None, :], mask=has_row[:, None] & (j < RU)[None, :], other=0.0)
        ub = tl.load(
            ub_ptr + row[:, None, None] * (OUT * RU) + o[None, :, None] * RU + j[None, None, :],
            mask=has_row[:, None, None] & omask[None, :, None] & (j < RU)[None, None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(hu[:, None, :] * ub, axis=2) * user_scaling
    base = tl.load(base_ptr + t[:, None] * OUT + o[None, :], mask=tom, other=0.0).to(tl.float32)
    tl.store(y_ptr + t[:, None] * OUT + o[None, :], (base + acc).to(y_ptr.dtype.element_ty), mask=tom)


@triton.jit
def _bwd_dh(
    dy_ptr, uid_ptr, b_ptr, ub_ptr, wh_ptr, h_ptr, logit_ptr, idx_ptr, dlext_ptr, dslot_ptr,
    dh_ptr, dhu_ptr, dlogit_ptr,
    T, scaling, user_scaling, inv_temperature,
    OUT: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RU: tl.constexpr, TOP_K: tl.constexpr,
    EP: tl.constexpr, ERP: tl.constexpr, RUP: tl.constexpr, KP: tl.constexpr,
    HAS_WH: tl.constexpr, HAS_U: tl.constexpr, HAS_DLEXT: tl.constexpr, DENSE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """DENSE=False (grouped strategy): d gate per (token, slot) arrives in dslot [T, k]."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    col = tl.arange(0, EP)
    c = tl.arange(0, ERP)
    cmask = c < E * R
    j = tl.arange(0, RUP)
    kcol = tl.arange(0, KP)
    uid = tl.load(uid_ptr + t, mask=tmask, other=-1)
    has_row = tmask & (uid >= 0)
    row = tl.where(has_row, uid, 0)
    boff = (c // R) * (OUT * R) + (c % R)

    dhg = tl.zeros((BLOCK_T, ERP), dtype=tl.float32)
    dhu = tl.zeros((BLOCK_T, RUP), dtype=tl.float32)
    for n0 in range(0, OUT, BLOCK_N):
        o = n0 + tl.arange(0, BLOCK_N)
        omask = o < OUT
        dy = tl.load(dy_ptr + t[:, None] * OUT + o[None, :], mask=tmask[:, None] & omask[None, :], other=0.0).to(tl.float32)
        if DENSE:
            b = tl.load(b_ptr + boff[None, :] + o[:, None] * R, mask=omask[:, None] & cmask[None, :], other=0.0)
            dhg = tl.dot(dy, b.to(tl.float32), dhg, input_precision=PREC)
        if HAS_U:
            ub = tl.load(
                ub_ptr + row[:, None, None] * (OUT * RU) + o[None, :, None] * RU + j[None, None, :],
                mask=has_row[:, None, None] & omask[None, :, None] & (j < RU)[None, None, :],
                other=0.0,
            ).to(tl.float32)
            dhu += tl.sum(dy[:, :, None] * ub, axis=1)
    dhg = dhg * scaling
    dhu = dhu * user_scaling

    tc = tmask[:, None] & cmask[None, :]
    te = tmask[:, None] & (col < E)[None, :]
    logits = tl.load(logit_ptr + t[:, None] * E + col[None, :], mask=te, other=0.0)
    idx = tl.load(idx_ptr + t[:, None] * TOP_K + kcol[None, :], mask=tmask[:, None] & (kcol < TOP_K)[None, :], other=-1)
    kept = tl.zeros((BLOCK_T, EP), dtype=tl.float32)
    dgate = tl.zeros((BLOCK_T, EP), dtype=tl.float32)
    for s in tl.static_range(TOP_K):
        sel = tl.sum(tl.where(kcol[None, :] == s, idx, 0), axis=1)
        kept = tl.where(col[None, :] == sel[:, None], 1.0, kept)
        if not DENSE:
            ds = tl.load(dslot_ptr + t * TOP_K + s, mask=tmask, other=0.0)
            dgate = tl.where(col[None, :] == sel[:, None], ds[:, None], dgate)
    p = softmax_rows(logits, col, E, inv_temperature)
    if DENSE:
        kept_sum = tl.sum(p * kept, axis=1)
        gate_dense = p * kept / tl.where(kept_sum > 0, kept_sum, 1.0)[:, None]
        onehot = _expand_onehot(E, R, EP, ERP).to(tl.float32)
        gate_cols = tl.dot(gate_dense, onehot, input_precision="ieee")
        h = tl.load(h_ptr + t[:, None] * (E * R) + c[None, :], mask=tc, other=0.0)
        # d gate of expert e = sum over its r columns of d(g*h) * h.
        dgate = tl.dot(dhg * h, tl.trans(onehot), input_precision="ieee")
        tl.store(dh_ptr + t[:, None] * (E * R) + c[None, :], dhg * gate_cols, mask=tc)
    dlogits = topk_backward(p, kept, dgate, inv_temperature)
    if HAS_DLEXT:
        dlogits += tl.load(dlext_ptr + t[:, None] * E + col[None, :], mask=te, other=0.0).to(tl.float32)
    dlogits = tl.where(te, dlogits, 0.0)
    if HAS_WH:
        wh = tl.load(wh_ptr + col[:, None] * RU + j[None, :], mask=(col < E)[:, None] & (j < RU)[None, :], other=0.0).to(tl.float32)
        dhu += tl.sum(dlogits[:, :, None] * wh[None, :, :], axis=1)

    tl.store(dlogit_ptr + t[:, None] * E + col[None, :], dlogits, mask=te)
    if HAS_U:
        tl.store(dhu_ptr + t[:, None] * RU + j[None, :], tl.where(has_row[:, None], dhu, 0.0), mask=tmask[:, None] & (j < RU)[None, :])


@triton.jit
def _bwd_dx(
    dh_ptr, dhu_ptr, dlogit_ptr, uid_ptr, a_ptr, ua_ptr, wx_ptr, extra_ptr, dxl_ptr, dx_ptr,
    T,
    IN: tl.constexpr, E: tl.constexpr, R: tl.constexpr, RU: tl.constexpr,
    EP: tl.constexpr, ERP: tl.constexpr, RUP: tl.constexpr,
    HAS_WX: tl.constexpr, HAS_U: tl.constexpr, SAME_X: tl.constexpr, DENSE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    """DENSE=False (grouped strategy): the experts' part of dx arrives in extra [T, IN] fp32."""
    pid_t = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tmask = t < T
    kmask = k < IN
    c = tl.arange(0, ERP)
    cmask = c < E * R
    tk = tmask[:, None] & kmask[None, :]
    if DENSE:
        dh = tl.load(dh_ptr + t[:, None] * (E * R) + c[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
        a = tl.load(a_ptr + c[:, None] * IN + k[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        dxl = tl.dot(dh, a.to(tl.float32), input_precision=PREC)
    else:
        dxl = tl.load(extra_ptr + t[:, None] * IN + k[None, :], mask=tk, other=0.0)
    if HAS_U:
        j = tl.arange(0, RUP)
        uid = tl.load(uid_ptr + t, mask=tmask, other=-1)
        has_row = tmask & (uid >= 0)
        row = tl.where(has_row, uid, 0)
        dhu = tl.load(dhu_ptr + t[:, None] * RU + j[None, :], mask=has_row[:, None] & (j < RU)[None, :], other=0.0)
        ua = tl.load(
            ua_ptr + row[:, None, None] * (RU * IN) + j[None, :, None] * IN + k[None, None, :],
            mask=has_row[:, None, None] & (j < RU)[None, :, None] & kmask[None, None, :],
            other=0.0,
        ).to(tl.float32)
        dxl += tl.sum(dhu[:, :, None] * ua, axis=1)
    if HAS_WX:
        col = tl.arange(0, EP)
        dl = tl.load(dlogit_ptr + t[:, None] * E + col[None, :], mask=tmask[:, None] & (col < E)[None, :], other=0.0)
        w = tl.load(wx_ptr + col[:, None] * IN + k[None, :], mask=(col < E)[:, None] & kmask[None, :], other=0.0)
        dxr = tl.dot(dl, w.to(tl.float32), input_precision=PREC)
        if SAME_X:
            dxl += dxr
        else:
            tl.store(dx_ptr + t[:, None] * IN + k[None, :], dxr.to(dx_ptr.dtype.element_ty), mask=tk)
    tl.store(dxl_ptr + t[:, None] * IN + k[None, :], dxl.to(dxl_ptr.dtype.element_ty), mask=tk)


# -- launchers ------------------------------------------------------------------------------

DENSE, GROUPED = "dense", "grouped"
STRATEGIES = (DENSE, GROUPED)


def choose_strategy(num_experts: int, rank: int) -> str:
    """Dense-masked while all experts' columns fit a small tile, grouped beyond."""
    return DENSE if num_experts * rank <= DENSE_AUTO_COLUMNS else GROUPED


# Dense is picked automatically up to this many expert columns (SPEC.md: E*r <= ~128).
DENSE_AUTO_COLUMNS = 128


class _Shapes:
    """Sizes, paddings and the launch config of one call, computed once."""

    def __init__(self, x2: Tensor, lora_A: Tensor, lora_B: Tensor, top_k: int, r_u: int, strategy: str) -> None:
        self.T, self.IN = x2.shape
        self.E, self.R, _ = lora_A.shape
        self.OUT = lora_B.shape[1]
        self.RU = r_u
        self.TOP_K = top_k
        self.dense = strategy == DENSE
        self.EP = _pow2(self.E)
        # The grouped strategy keeps no [T, E*r] tile: a minimal dummy width.
        self.ERP = _pow2(self.E * self.R) if self.dense else 16
        self.RP = _pow2(self.R)
        self.RUP = _pow2(r_u, floor=2)
        self.KP = _pow2(top_k, floor=2)
        self.BLOCK_T, self.BLOCK_K, self.BLOCK_N, self.num_warps = _config(self.ERP)
        self.BLOCK_P = self.BLOCK_T
        self.PREC = _precision(x2.dtype)
        if self.dense and self.E * self.R > DENSE_MAX_COLUMNS:
            raise ValueError(f"the dense Triton strategy holds E*r <= {DENSE_MAX_COLUMNS}, got {self.E * self.R}")
        if self.EP > 1024:
            raise ValueError(f"the Triton kernels route over at most 1024 experts, got {self.E}")

    def consts(self) -> dict:
        return dict(E=self.E, R=self.R, RU=self.RU, ERP=self.ERP, RUP=self.RUP, PREC=self.PREC)

    def grouped_consts(self) -> dict:
        return dict(E=self.E, R=self.R, RP=self.RP, TOP_K=self.TOP_K, BLOCK_P=self.BLOCK_P, PREC=self.PREC,
                    num_warps=self.num_warps)

    def num_pairs(self) -> int:
        return self.T * self.TOP_K


def _side_widths(s: _Shapes) -> tuple[int, int]:
    """Rows and width of the saved h and g*h: [T, E*r] dense, [T*k, r] grouped (sorted pairs)."""
    return (s.T, s.E * s.R) if s.dense else (s.num_pairs(), s.R)


def _meta_len(s: _Shapes) -> int:
    if s.dense:
        return 0
    return s.num_pairs() + s.E + 1 + 2 * triton_grouped.num_blocks(s.num_pairs(), s.E, s.BLOCK_P)


def forward(s: _Shapes, x2, xl2, base2, uid, lora_A, lora_B, scaling, temperature,
            router_x, router_user, router_h, user_A, user_B, user_scaling):
    """Launch the forward. All 2-D [T, *] contiguous.

    Returns y and the side outputs the backward needs: (h, g*h, h_u, logits, gates fp32,
    indices, meta) where meta packs the grouped schedule (empty for dense)."""
    dev = x2.device
    f32 = dict(device=dev, dtype=torch.float32)
    rows, width = _side_widths(s)
    h = _empty(rows, width, **f32)
    hg = _empty(rows, width, **f32)
    hu = _empty(s.T, max(s.RU, 1), **f32)
    logits = _empty(s.T, s.E, **f32)
    gates = _empty(s.T, s.TOP_K, **f32)
    idx = _empty(s.T, s.TOP_K, device=dev, dtype=torch.long)
    dummy = x2
    has_u = s.RU > 0
    _fwd_shrink_route[(triton.cdiv(s.T, s.BLOCK_T),)](
        x2, xl2, uid, lora_A,
        router_x if router_x is not None else dummy,
        router_user if router_user is not None else dummy,
        router_h if router_h is not None else dummy,
        user_A if has_u else dummy,
        h, hg, hu, logits, gates, idx,
        s.T, (router_user.shape[0] - 1) if router_user is not None else 0, 1.0 / temperature,
        IN=s.IN, TOP_K=s.TOP_K, EP=s.EP, KP=s.KP,
        HAS_WX=router_x is not None, HAS_R=router_user is not None,
        HAS_WH=router_h is not None and has_u, HAS_U=has_u, SAME_X=xl2 is x2, SHRINK=s.dense,
        BLOCK_T=s.BLOCK_T, BLOCK_K=s.BLOCK_K, num_warps=s.num_warps, **s.consts(),
    )
    extra = dummy
    meta = torch.empty(0, dtype=torch.long, device=dev)
    if not s.dense:
        sched = triton_grouped.make_schedule(idx, s.E, s.BLOCK_P)
        meta = sched.pack()
        nb = sched.block_expert.numel()
        args = (sched.order, sched.seg, sched.block_expert, sched.block_start)
        triton_grouped._shrink[(nb,)](xl2, lora_A, gates, *args, h, hg, IN=s.IN, BLOCK_K=s.BLOCK_K, **s.grouped_consts())
        extra = torch.zeros(s.T, s.OUT, **f32)  # accumulated by atomic adds: must start at 0
        triton_grouped._expand[(nb, triton.cdiv(s.OUT, s.BLOCK_N))](
            hg, lora_B, *args, extra, scaling, OUT=s.OUT, BLOCK_N=s.BLOCK_N, **s.grouped_consts()
        )
    y = _empty(s.T, s.OUT, device=dev, dtype=base2.dtype)
    grid = (triton.cdiv(s.T, s.BLOCK_T), triton.cdiv(s.OUT, s.BLOCK_N))
    _fwd_expand[grid](
        hg, hu, uid, lora_B, user_B if has_u else dummy, base2, extra, y,
        s.T, scaling, user_scaling,
        OUT=s.OUT, HAS_U=has_u, DENSE=s.dense, BLOCK_T=s.BLOCK_T, BLOCK_N=s.BLOCK_N, num_warps=s.num_warps,
        **s.consts(),
    )
    return y, (h, hg, hu, logits, gates, idx, meta)


def _segment_gemm(s: _Shapes, sched, left, right, M, N, left_by_token, right_by_token, scale, dtype):
    out = _empty(s.E, M, N, device=left.device, dtype=torch.float32)
    bm, bn = min(_pow2(M), 64), min(_pow2(N), 64)
    triton_grouped._segment_gemm[(s.E, triton.cdiv(M, bm), triton.cdiv(N, bn))](
        left, right, sched.order, sched.seg, out, scale,
        M=M, N=N, L_BY_TOKEN=left_by_token, R_BY_TOKEN=right_by_token, TOP_K=s.TOP_K,
        BLOCK_P=s.BLOCK_P, BLOCK_M=bm, BLOCK_N=bn, PREC=s.PREC, num_warps=s.num_warps,
    )
    return out.to(dtype)


def backward(s: _Shapes, dy2, dlext, saved, x2, xl2, uid, groups, lora_A, lora_B, scaling, temperature,
             router_x, router_user, router_h, user_A, user_B, user_scaling, needs):
    """Gradients for (x, x_lora, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B)."""
    h, hg, hu, logits, gates, idx, meta = saved
    has_u = s.RU > 0
    dev = x2.device
    f32 = dict(device=dev, dtype=torch.float32)
    dy2 = dy2.contiguous()
    rows, width = _side_widths(s)
    dh = _empty(rows, width, **f32)
    dhu = _empty(s.T, max(s.RU, 1), **f32)
    dlogits = _empty(s.T, s.E, **f32)
    dummy = x2
    dslot = dummy
    extra = dummy
    if not s.dense:
        sched = triton_grouped.Schedule.unpack(meta, s.num_pairs(), s.E, s.BLOCK_P)
        nb = sched.block_expert.numel()
        args = (sched.order, sched.seg, sched.block_expert, sched.block_start)
        dslot = _empty(s.T, s.TOP_K, **f32)
        triton_grouped._bwd_dh[(nb,)](
            dy2, lora_B, h, gates, *args, dh, dslot, scaling, OUT=s.OUT, BLOCK_N=s.BLOCK_N, **s.grouped_consts()
        )
        extra = torch.zeros(s.T, s.IN, **f32)  # accumulated by atomic adds: must start at 0
        triton_grouped._bwd_dx[(nb, triton.cdiv(s.IN, s.BLOCK_K))](
            dh, lora_A, *args, extra, IN=s.IN, BLOCK_K=s.BLOCK_K, **s.grouped_consts()
        )
    _bwd_dh[(triton.cdiv(s.T, s.BLOCK_T),)](
        dy2, uid, lora_B, user_B if has_u else dummy, router_h if router_h is not None else dummy,
        h, logits, idx, dlext.contiguous() if dlext is not None else dummy, dslot,
        dh, dhu, dlogits,
        s.T, scaling, user_scaling, 1.0 / temperature,
        OUT=s.OUT, TOP_K=s.TOP_K, EP=s.EP, KP=s.KP,
        HAS_WH=router_h is not None and has_u, HAS_U=has_u, HAS_DLEXT=dlext is not None, DENSE=s.dense,
        BLOCK_T=s.BLOCK_T, BLOCK_N=s.BLOCK_N, num_warps=s.num_warps, **s.consts(),
    )
    same_x = xl2 is x2
    dxl = _empty(*xl2.shape, device=dev, dtype=xl2.dtype)
    dx = dxl if same_x or router_x is None else _empty(*x2.shape, device=dev, dtype=x2.dtype)
    _bwd_dx[(triton.cdiv(s.T, s.BLOCK_T), triton.cdiv(s.IN, s.BLOCK_K))](
        dh, dhu, dlogits, uid, lora_A, user_A if has_u else dummy,
        router_x if router_x is not None else dummy, extra, dxl, dx,
        s.T, IN=s.IN, EP=s.EP,
        HAS_WX=router_x is not None, HAS_U=has_u, SAME_X=same_x, DENSE=s.dense,
        BLOCK_T=s.BLOCK_T, BLOCK_K=s.BLOCK_K, num_warps=s.num_warps, **s.consts(),
    )
    if same_x:
        dx_out, dxl_out = dxl, None
    else:
        dx_out = dx if router_x is not None else None
        dxl_out = dxl
    grads = dict(x=dx_out, x_lora=dxl_out)
    if s.dense:
        if needs["lora_A"]:
            grads["lora_A"] = (dh.t() @ xl2.float()).reshape(lora_A.shape).to(lora_A.dtype)
        if needs["lora_B"]:
            grads["lora_B"] = ((dy2.float().t() @ hg) * scaling).reshape(s.OUT, s.E, s.R).permute(1, 0, 2).to(lora_B.dtype)
    else:
        if needs["lora_A"]:
            grads["lora_A"] = _segment_gemm(s, sched, dh, xl2, s.R, s.IN, False, True, 1.0, lora_A.dtype)
        if needs["lora_B"]:
            grads["lora_B"] = _segment_gemm(s, sched, dy2, hg, s.OUT, s.R, True, False, scaling, lora_B.dtype)
    grads.update(router_and_bank_grads(dlogits, dhu, dy2, x2, xl2, hu, uid, groups, router_x, router_user, router_h,
                                       user_A, user_B, user_scaling, needs))
    return grads


# -- torch.library ops: torch.compile and CUDA graphs see each direction as one op ------------

_GRAD_NAMES = ("x", "x_lora", "lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")


def _shapes_of(x: Tensor, lora_A: Tensor, lora_B: Tensor, top_k: int, user_A: Optional[Tensor], strategy: str):
    x2 = x.reshape(-1, x.shape[-1])
    return _Shapes(x2, lora_A, lora_B, top_k, user_A.shape[1] if user_A is not None else 0, strategy)


def _contiguous(*ts):
    return [t.contiguous() if t is not None else None for t in ts]


@torch.library.custom_op("proper::triton_linear_fwd", mutates_args=())
def _fwd_op(
    x: Tensor, x_lora: Tensor, base_out: Tensor, uid: Tensor, lora_A: Tensor, lora_B: Tensor,
    router_x: Optional[Tensor], router_user: Optional[Tensor], router_h: Optional[Tensor],
    user_A: Optional[Tensor], user_B: Optional[Tensor],
    scaling: float, top_k: int, temperature: float, user_scaling: float, same_x: bool, groups: int, strategy: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, logits fp32, gates fp32, indices, h, g*h, h_u, schedule): y shaped like base_out.

    groups: the number of sequences when each holds one user (0: ids per token); the
    backward uses it to sum the user bank's gradient per sequence."""
    s = _shapes_of(x, lora_A, lora_B, top_k, user_A, strategy)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    xl2 = x2 if same_x else x_lora.reshape(-1, x.shape[-1]).contiguous()
    base2 = base_out.reshape(-1, base_out.shape[-1]).contiguous()
    p = _contiguous(lora_A, lora_B, router_x, router_user, router_h, user_A, user_B)
    y, side = forward(s, x2, xl2, base2, uid, *p[:2], scaling, temperature, *p[2:], user_scaling)
    return (y.reshape(base_out.shape),) + side[3:6] + side[:3] + (side[6],)


@_fwd_op.register_fake
def _(x, x_lora, base_out, uid, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
      scaling, top_k, temperature, user_scaling, same_x, groups, strategy):
    s = _shapes_of(x, lora_A, lora_B, top_k, user_A, strategy)
    rows, width = _side_widths(s)
    f32 = dict(dtype=torch.float32)
    return (
        base_out.new_empty(base_out.shape), x.new_empty(s.T, s.E, **f32), x.new_empty(s.T, top_k, **f32),
        x.new_empty(s.T, top_k, dtype=torch.long), x.new_empty(rows, width, **f32),
        x.new_empty(rows, width, **f32), x.new_empty(s.T, max(s.RU, 1), **f32),
        x.new_empty(_meta_len(s), dtype=torch.long),
    )


@torch.library.custom_op("proper::triton_linear_bwd", mutates_args=())
def _bwd_op(
    dy: Tensor, dlogits: Optional[Tensor], x: Tensor, x_lora: Tensor, uid: Tensor, groups: int,
    lora_A: Tensor, lora_B: Tensor, router_x: Optional[Tensor], router_user: Optional[Tensor],
    router_h: Optional[Tensor], user_A: Optional[Tensor], user_B: Optional[Tensor],
    logits: Tensor, gates: Tensor, idx: Tensor, h: Tensor, hg: Tensor, hu: Tensor, meta: Tensor,
    scaling: float, top_k: int, temperature: float, user_scaling: float, same_x: bool, strategy: str,
    needs: list[bool],
) -> list[Tensor]:
    """Gradients in the order of _GRAD_NAMES; an empty tensor stands for no gradient."""
    s = _shapes_of(x, lora_A, lora_B, top_k, user_A, strategy)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    xl2 = x2 if same_x else x_lora.reshape(-1, x.shape[-1]).contiguous()
    p = _contiguous(lora_A, lora_B, router_x, router_user, router_h, user_A, user_B)
    g = backward(
        s, dy.reshape(-1, dy.shape[-1]), dlogits, (h, hg, hu, logits, gates, idx, meta), x2, xl2, uid,
        groups or None, *p[:2], scaling, temperature, *p[2:], user_scaling, dict(zip(_GRAD_NAMES[2:], needs)),
    )
    return [x.new_empty(0) if g.get(n) is None else g[n].reshape(x.shape) if n in ("x", "x_lora") else g[n]
            for n in _GRAD_NAMES]


def _grad_present(name, same_x, router_x, has_u, router_user, router_h, needs):
    if name == "x":
        return same_x or router_x is not None
    if name == "x_lora":
        return not same_x
    need = dict(zip(_GRAD_NAMES[2:], needs))[name]
    present = dict(lora_A=True, lora_B=True, router_x=router_x is not None, router_user=router_user is not None,
                   router_h=router_h is not None and has_u, user_A=has_u, user_B=has_u)[name]
    return need and present


@_bwd_op.register_fake
def _(dy, dlogits, x, x_lora, uid, groups, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
      logits, gates, idx, h, hg, hu, meta, scaling, top_k, temperature, user_scaling, same_x, strategy, needs):
    has_u = user_A is not None and user_A.shape[1] > 0
    like = dict(x=x, x_lora=x, lora_A=lora_A, lora_B=lora_B, router_x=router_x, router_user=router_user,
                router_h=router_h, user_A=user_A, user_B=user_B)
    return [torch.empty_like(like[n]) if _grad_present(n, same_x, router_x, has_u, router_user, router_h, needs)
            else x.new_empty(0) for n in _GRAD_NAMES]


def _setup_context(ctx, inputs, output):
    (x, x_lora, base_out, uid, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
     scaling, top_k, temperature, user_scaling, same_x, groups, strategy) = inputs
    _, logits, gates, idx, h, hg, hu, meta = output
    ctx.save_for_backward(x, x_lora, uid, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
                          logits, gates, idx, h, hg, hu, meta)
    ctx.consts = (groups, scaling, top_k, temperature, user_scaling, same_x, strategy)
    ctx.mark_non_differentiable(gates, idx, h, hg, hu, meta)


def _backward(ctx, dy, dlogits, *_unused):
    saved = ctx.saved_tensors
    x = saved[0]
    groups, scaling, top_k, temperature, user_scaling, same_x, strategy = ctx.consts
    needs = list(ctx.needs_input_grad[4:11])
    grads = _bwd_op(dy, dlogits, *saved[:3], groups, *saved[3:], scaling, top_k, temperature, user_scaling,
                    same_x, strategy, needs)
    g = dict(zip(_GRAD_NAMES, grads))
    g = {n: (t if t.numel() or (n in ("x", "x_lora") and t.shape == x.shape) else None) for n, t in g.items()}
    dxl = None if same_x else g["x_lora"]
    dbase = dy if ctx.needs_input_grad[2] else None
    return (g["x"], dxl, dbase, None, g["lora_A"], g["lora_B"], g["router_x"], g["router_user"], g["router_h"],
            g["user_A"], g["user_B"], None, None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def proper_linear(x, base_out, lora_A, lora_B, scaling, *, top_k, temperature=1.0, router_x=None,
                  router_user=None, router_h=None, user_ids=None, user_A=None, user_B=None,
                  user_scaling=0.0, x_lora=None, inplace=False, sparse_grad=False, strategy=None):
    """Same contract as proper_kernels.reference.proper_linear (the gates it returns carry no
    gradient; the logits do, so a load-balance loss trains the routers).

    strategy: "dense" | "grouped" | None (chosen from E*r by choose_strategy)."""
    if sparse_grad:
        raise ValueError("sparse_grad (sparse user-bank gradients) needs the torch backend")
    same_x = x_lora is None or x_lora is x  # inplace: ignored, the kernels write a fresh output
    if user_A is not None and user_A.shape[1] == 0:
        user_A = user_B = None
    if user_A is None:
        router_h = None
    if strategy is None:
        strategy = choose_strategy(lora_A.shape[0], lora_A.shape[1])
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    uid = token_user_ids(user_ids, x.shape[:-1], x.device)
    groups = user_ids.shape[0] if user_ids is not None and user_ids.shape != x.shape[:-1] else 0
    y, logits, gates, idx, *_ = _fwd_op(
        x, x if same_x else x_lora, base_out, uid, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
        float(scaling), int(top_k), float(temperature), float(user_scaling), same_x, groups, strategy,
    )
    return y, Routing(logits.to(x.dtype), gates.to(x.dtype), idx)
