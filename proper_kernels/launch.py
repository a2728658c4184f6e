"""Every Triton launch goes through :func:`launch`, with its configuration from one table.

- The target: ``"sm90"`` (Hopper and later), ``"sm80"`` (Ampere, Ada) or ``"interp"`` (the
  Triton interpreter, which prefers few large programs). :func:`target_of` reads it from the
  device; :func:`recording` can force one.
- ``CONFIGS``: the tuned launch configurations, keyed by (kernel, target, size class). The
  kernels and their launchers (``triton_dense``, ``triton_dense_bwd``, ``triton_grouped``)
  hold none: the op's call (``triton_call.Call``) reads each launch's entry once.
- :func:`recording`: a context in which launches are collected instead of run. Called with
  tensors on the ``meta`` device, the real host code of a forward and a backward then yields
  the exact launches a GPU would get, for any shape, for free. The compile gate
  (``proper_kernels.compile_check``) and the cost model (``proper_kernels.cost``) read them.
- Every launch runs under the device guard of its tensors (a model split over GPUs).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

TARGETS = ("sm90", "sm80")
NUM_SMS = {"sm90": 132, "sm80": 108, "interp": 4}


@dataclass
class Launch:
    """One recorded kernel launch: what the compile gate compiles and the cost model counts."""

    kernel: Any  # a triton JITFunction
    grid: tuple
    args: tuple
    consts: dict
    num_warps: int
    num_stages: int
    bytes: int = 0  # HBM bytes this launch moves (each tensor once; weights read from L2 after)
    flops: int = 0
    note: str = ""

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else str(self.kernel)


@dataclass
class _Recorder:
    target: str
    launches: list = field(default_factory=list)


_recorder: Optional[_Recorder] = None
_forced_target: Optional[str] = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def target_of(device: torch.device) -> str:
    """The configuration family for launches on `device`."""
    if _recorder is not None:
        return _recorder.target
    if _forced_target is not None:
        return _forced_target
    if interpreting() or device.type != "cuda":
        return "interp"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major >= 9 else "sm80"


def num_sms(device: torch.device, target: str) -> int:
    if _recorder is None and device.type == "cuda" and not interpreting():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NUM_SMS[target]


@contextlib.contextmanager
def recording(target: str) -> Iterator[list]:
    """Collect launches (a list of :class:`Launch`) instead of running them; the host code
    sees `target`. Use tensors on the meta device."""
    global _recorder
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    previous, _recorder = _recorder, _Recorder(target)
    try:
        yield _recorder.launches
    finally:
        _recorder = previous


@contextlib.contextmanager
def force_target(target: Optional[str]) -> Iterator[None]:
    """Run with `target`'s configurations (tests use it to run the GPU configurations under
    the interpreter)."""
    global _forced_target
    previous, _forced_target = _forced_target, target
    try:
        yield
    finally:
        _forced_target = previous


def launch(kernel, grid: tuple, args: tuple, consts: dict, num_warps: int, num_stages: int,
           bytes: int = 0, flops: int = 0, note: str = "") -> None:
    """Run `kernel` on `grid` (or record it, inside :func:`recording`)."""
    if any(g == 0 for g in grid):
        return
    if _recorder is not None:
        _recorder.launches.append(Launch(kernel, grid, args, consts, num_warps, num_stages, bytes, flops, note))
        return
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    guard = torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)


@dataclass
class External:
    """A step of the host code that is not one of our kernels (a cuBLAS GEMM), recorded for
    the cost model."""

    name: str
    bytes: int
    flops: int
    grid: tuple = ()
    note: str = "torch.matmul (cuBLAS)"


def record_external(name: str, bytes: int, flops: int) -> None:
    if _recorder is not None:
        _recorder.launches.append(External(name, bytes, flops))


# -- the configuration table -----------------------------------------------------------------
#
# Size classes: "prefill" (many tokens: tiles 64 tokens tall, so sm_90 runs wgmma) and
# "decode" (few tokens: short tiles, split-K shrink and narrow expand tiles, so that the
# launch covers every SM). Widths are the padded expert columns (E*r) of the dense strategy.
# Values: BLOCK_T (tokens), BLOCK_K or BLOCK_N (features), num_warps, num_stages.

DECODE_TOKENS = 256  # up to this many tokens a call is "decode"
FP32_COLUMN_CHUNK = 32  # expert columns per dot for fp32 inputs
WIDE_COLUMN_CHUNK = 256  # expert columns per dot for 16-bit inputs (all of a dense strategy's)
SHRINK_COLUMN_CHUNK = 128  # expert columns per program of the grouped strategy's dense shrink

CONFIGS: dict[tuple, tuple] = {}


def _fill() -> None:
    for tgt in TARGETS:
        stages = 3 if tgt == "sm90" else 2
        for width in (16, 32, 64, 128, 256):
            wide = width >= 256
            # sm_80 holds mma.sync operands in registers: from 128 columns on, 8 warps and a
            # shorter feature step keep it under 255 registers.
            roomy = wide or (tgt == "sm80" and width >= 128)
            CONFIGS[("shrink", tgt, "prefill", width)] = (64, 32 if roomy else 64, 8 if roomy else 4, stages)
            CONFIGS[("shrink", tgt, "decode", width)] = (16, 64, 4, stages)
            CONFIGS[("expand", tgt, "prefill", width)] = (64, 64 if wide else 128, 4 if width <= 64 else 8, stages)
            CONFIGS[("expand", tgt, "decode", width)] = (16, 64, 4, stages)
            CONFIGS[("bwd_dh", tgt, "prefill", width)] = (64, 64 if width <= 128 else 32, 4 if width <= 64 else 8, stages)
            CONFIGS[("bwd_dh", tgt, "decode", width)] = (16, 64, 4, stages)
            CONFIGS[("bwd_dx", tgt, "prefill", width)] = (64, 128 if width <= 64 else 64, 4 if width <= 64 else 8, stages)
            CONFIGS[("bwd_dx", tgt, "decode", width)] = (16, 64, 4, stages)
        # The grouped strategy's routing kernels (forward, backward, the router's part of
        # dx): no expert columns in the tile, but rows of up to 1024 experts; keyed by E
        # padded (EP), the tile keeps about 4K router values.
        for ep in (16, 32, 64, 128, 256, 512, 1024):
            bt = max(16, min(64, 4096 // ep))
            warps = 8 if ep >= 256 else 4
            CONFIGS[("route", tgt, "any", ep)] = (bt, 32 if ep >= 512 else 64, warps, stages)
            CONFIGS[("route_bwd", tgt, "any", ep)] = (bt, 32 if ep >= 256 else 64, warps, stages)
            CONFIGS[("route_dx", tgt, "any", ep)] = (bt, 64, warps, stages)
            CONFIGS[("route", tgt, "any", ep, "fp32")] = (min(bt, 32), 32, warps, 2)
            CONFIGS[("route_bwd", tgt, "any", ep, "fp32")] = (min(bt, 16), 32, 8, 2)
            CONFIGS[("route_dx", tgt, "any", ep, "fp32")] = (min(bt, 32), 32, 4, 2)
        # Summing the split-K partials and routing: rows of E*r fp32 columns.
        for width in (16, 32, 64, 128, 256):
            CONFIGS[("reduce", tgt, "any", width)] = (max(16, min(64, 2048 // width)), 0, 4, 1)
        # Grouped strategy: blocks of (token, slot) pairs of one expert.
        CONFIGS[("grouped", tgt, "any", 0)] = (64, 64, 4, stages)
        CONFIGS[("shrink_wide", tgt, "any", 0)] = (64, 64, 4, stages)
        CONFIGS[("shrink_wide", tgt, "any", 0, "fp32")] = (32, 32, 4, 2)
        CONFIGS[("bwd_dh_wide", tgt, "any", 0)] = (64, 64, 4, stages)
        CONFIGS[("bwd_dh_wide", tgt, "any", 0, "fp32")] = (32, 32, 4, 2)
        # Per-expert weight gradients of the grouped strategy: (largest BLOCK_M, largest
        # BLOCK_N; each is the padded M or N up to it), warps, stages; pairs in steps of
        # the "grouped" BLOCK_P.
        CONFIGS[("segment", tgt, "any", 0)] = (64, 64, 4, stages)
        # Weight gradients streamed over the tokens: (BLOCK_P tokens a step, BLOCK_K or
        # BLOCK_M features a program, warps, stages); one program per feature tile.
        for width in (16, 32, 64, 128, 256):
            CONFIGS[("wgrad_in", tgt, "any", width)] = (64, 32, 4 if width <= 128 else 8, stages)
            CONFIGS[("wgrad_out", tgt, "any", width)] = (64, 32, 4 if width <= 128 else 8, stages)
            CONFIGS[("wgrad_in", tgt, "any", width, "fp32")] = (32, 32, 4 if width <= 64 else 8, 2)
            CONFIGS[("wgrad_out", tgt, "any", width, "fp32")] = (32, 32, 4 if width <= 64 else 8, 2)
        # fp32 inputs: IEEE fp32 dots run on CUDA cores with both operands in registers, so
        # every tile is smaller (tf32 uses the same tiles).
        for width in (16, 32, 64, 128, 256):
            for kind in ("shrink", "expand", "bwd_dh", "bwd_dx"):
                warps = 8 if width >= 256 or kind in ("expand", "bwd_dh") else 4
                CONFIGS[(kind, tgt, "prefill", width, "fp32")] = (32, 32, warps, 2)
                CONFIGS[(kind, tgt, "decode", width, "fp32")] = (16, 32, warps, 2)
        CONFIGS[("bwd_dh", tgt, "prefill", 16, "fp32")] = (16, 32, 8, 2)
    for kind in ("shrink", "expand", "bwd_dh", "bwd_dx"):
        for width in (16, 32, 64, 128, 256):
            for size in ("prefill", "decode"):
                CONFIGS[(kind, "interp", size, width)] = (64, 64, 1, 1)
    CONFIGS[("grouped", "interp", "any", 0)] = (64, 64, 1, 1)
    CONFIGS[("shrink_wide", "interp", "any", 0)] = (64, 64, 1, 1)
    CONFIGS[("bwd_dh_wide", "interp", "any", 0)] = (64, 64, 1, 1)
    CONFIGS[("segment", "interp", "any", 0)] = (64, 64, 1, 1)
    for ep in (16, 32, 64, 128, 256, 512, 1024):
        for kind in ("route", "route_bwd", "route_dx"):
            CONFIGS[(kind, "interp", "any", ep)] = (64, 64, 1, 1)
    for width in (16, 32, 64, 128, 256):
        CONFIGS[("reduce", "interp", "any", width)] = (64, 0, 1, 1)
        CONFIGS[("wgrad_in", "interp", "any", width)] = (64, 64, 1, 1)
        CONFIGS[("wgrad_out", "interp", "any", width)] = (64, 64, 1, 1)
    # The standalone router_topk op (proper_kernels.triton_router): one token's E logits
    # (padded to EP, at least 16) in a row, about 1-2K values a tile; the same on every
    # target, and 3 stages (Triton's default: no loop of loads to pipeline).
    for ep, (bt, warps) in {16: (64, 4), 32: (64, 4), 64: (32, 4), 128: (16, 4), 256: (8, 4), 512: (4, 8),
                            1024: (4, 8)}.items():
        for tgt in TARGETS + ("interp",):
            CONFIGS[("router_topk", tgt, "any", ep)] = (bt, ep, warps, 3)


_fill()


def size_class(num_tokens: int) -> str:
    return "decode" if num_tokens <= DECODE_TOKENS else "prefill"


def config(kind: str, target: str, size: str = "any", width: int = 0, fp32: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_K or BLOCK_N, num_warps, num_stages) for a launch (fp32: the entry for
    fp32 inputs where the table has one)."""
    key = (kind, target, size, width)
    return CONFIGS.get(key + ("fp32",), CONFIGS[key]) if fp32 else CONFIGS[key]
