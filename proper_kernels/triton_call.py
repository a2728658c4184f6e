"""The sizes, paddings, dtypes and launch configurations of one call of the fused op, and
the choice of strategy: what every launcher of ``triton_dense``, ``triton_dense_bwd`` and
``triton_grouped`` reads (``s``). The configurations come from ``proper_kernels.launch``'s
table, each read once per call.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from . import launch as _launch
from . import triton_grouped
from .triton_blocks import dot_dtype, pow2, precision

# Largest E*r the dense strategy holds in one tile.
DENSE_MAX_COLUMNS = 256

DENSE, GROUPED = "dense", "grouped"
STRATEGIES = (DENSE, GROUPED)

# Dense is picked automatically up to this many expert columns (E*r).
DENSE_AUTO_COLUMNS = 128


def choose_strategy(num_experts: int, rank: int) -> str:
    """Dense-masked while all experts' columns fit a small tile, grouped beyond."""
    return DENSE if num_experts * rank <= DENSE_AUTO_COLUMNS else GROUPED


class Call:
    """Sizes, paddings, dtypes and launch configurations of one call, computed once."""

    def __init__(self, x2: Tensor, lora_A: Tensor, lora_B: Tensor, top_k: int, r_u: int, strategy: str) -> None:
        self.T, self.IN = x2.shape
        self.E, self.R, _ = lora_A.shape
        self.OUT = lora_B.shape[1]
        self.RU = r_u
        self.TOP_K = top_k
        self.dense = strategy == DENSE
        self.ER = self.E * self.R
        self.EP = pow2(self.E)
        self.ERP = pow2(self.ER) if self.dense else 16  # grouped: no [T, E*r] tile
        self.RP = pow2(self.R)
        self.RUP = pow2(r_u)
        self.KP = pow2(top_k, floor=2)
        # Grouped up to WIDE_MAX_COLUMNS: the expand and dx read g*h and dh in a dense layout.
        self.wide = not self.dense and self.ER <= triton_grouped.WIDE_MAX_COLUMNS
        # ... and while the dense FLOPs cost less than k gathers of x, the shrink too.
        self.wide_shrink = self.wide and self.ER <= triton_grouped.WIDE_SHRINK_PER_SLOT * top_k
        self.ERX = pow2(self.ER) if (self.dense or self.wide) else 16  # columns the expand and dx see
        self.CW = (self.ER if (self.dense or self.wide) else 0) + self.E  # width of the backward's dcat
        self.LOFF = self.CW - self.E  # where d logits start in dcat
        self.dtype = x2.dtype
        self.DT = dot_dtype(x2.dtype)
        self.PREC = precision(x2.dtype)
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
        self.segment = cfg("segment")  # block caps for the expert's M and N, warps, stages
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

    def num_pairs(self) -> int:
        return self.T * self.TOP_K


def side_widths(s: Call) -> tuple[int, int]:
    """Rows and width of the saved h and g*h: [T, E*r] dense (and grouped with the dense
    shrink), [T*k, r] grouped (sorted pairs)."""
    return (s.T, s.ER) if (s.dense or s.wide_shrink) else (s.num_pairs(), s.R)


def meta_len(s: Call) -> int:
    if s.dense:
        return 0
    return s.num_pairs() + s.E + 1 + 2 * triton_grouped.num_blocks(s.num_pairs(), s.E, s.BLOCK_P)
