"""Pieces shared by the Triton kernels of the fused op, whatever their strategy.

Device side: the block of sorted tokens a program owns and the user runs in it (the plan's
rows, ``proper_kernels.plan``), the bank row a run's gradient goes to, the gate of each
expert column, and an fp32-exact dot for 16-bit operands. Host side: the dtype dots take,
the input precision of fp32 dots, and the byte counts every launch reports.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch as _launch
from .triton_utils import slot

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


def dot_dtype(dtype: torch.dtype):
    """The dtype dots take: the input's own, except bf16 under the interpreter (which holds
    bf16 as raw 16-bit words, so its arithmetic needs an fp32 upcast first)."""
    if dtype == torch.bfloat16 and _launch.interpreting():
        return tl.float32
    return _TL[dtype]


def precision(dtype: torch.dtype) -> str:
    """input_precision of fp32 dots (16-bit dots ignore it)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _launch.interpreting():
        return "tf32"
    return "ieee"


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def bank_bytes(bank: Tensor, rows: Optional[int]) -> int:
    """Bytes of the bank rows a batch reads (rows None: the whole bank)."""
    n = bank.shape[0] if rows is None else min(rows, bank.shape[0])
    return n * (bank.numel() // max(1, bank.shape[0])) * bank.element_size()


# -- device helpers ---------------------------------------------------------------------------


@triton.jit
def runs(run_ptr, start, pos, pmask, T, BLOCK: tl.constexpr):
    """The run of each sorted position of a block, and the block's first and last run."""
    prun = tl.load(run_ptr + pos, mask=pmask, other=-1)
    r_first = tl.load(run_ptr + start)
    r_last = tl.load(run_ptr + tl.minimum(start + BLOCK, T) - 1)
    return prun, r_first, r_last


@triton.jit
def block_tokens(order_ptr, run_ptr, T, BLOCK_T: tl.constexpr):
    """This program's block of sorted positions: (positions, mask, token ids, run of each
    position, first and last run in the block)."""
    start = tl.program_id(0) * BLOCK_T
    pos = start + tl.arange(0, BLOCK_T)
    pmask = pos < T
    tok = tl.load(order_ptr + pos, mask=pmask, other=0)
    prun, r_first, r_last = runs(run_ptr, start, pos, pmask, T, BLOCK_T)
    return pos, pmask, tok, prun, r_first, r_last


@triton.jit
def bank_row(run_user_ptr, rr, COMPACT: tl.constexpr):
    """(user of run rr, the gradient row it writes: the user's, or rr itself when COMPACT)."""
    u = tl.load(run_user_ptr + rr)
    if COMPACT:
        row = u * 0 + rr  # int64, also where the interpreter's rr is a Python int
    else:
        row = u
    return u, row


@triton.jit
def dot_f32(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    """a @ b for an fp32 a and a b in the dot dtype DT, on tensor cores and nearly as exact as
    fp32: a is split into a DT high part and a DT remainder (two dots). Keeps the router's
    W_h terms in fp32 precision for 16-bit inputs."""
    if DT == tl.float32:
        return tl.dot(a, b, input_precision=PREC)
    hi = a.to(DT)
    lo = (a - hi.to(tl.float32)).to(DT)
    return tl.dot(hi, b, input_precision=PREC) + tl.dot(lo, b, input_precision=PREC)


@triton.jit
def gate_columns(idx, gates, kcol, c, BLOCK_T: tl.constexpr, ERP: tl.constexpr, R: tl.constexpr,
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
def at(rows, cols, s_row, s_col):
    """Element offsets [rows, cols] of a strided 2-D tensor (rows int64 token ids or
    positions; the column offset taken in int64 too, for a transposed input)."""
    return rows[:, None] * s_row + cols[None, :].to(tl.int64) * s_col
