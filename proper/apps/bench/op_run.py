"""Timing the op level (see op.py): one case, its variants, in each mode."""

from __future__ import annotations

import gc
from typing import Callable, Optional, Sequence

import torch

from .op import (MODES, TIMING_ORDER, InputSet, OpCase, Variant, cast_layer, make_inputs, make_layer, make_variants,
                 num_input_sets, op_cases, proper_call)
from .schema import make_row
from .timing import Timing, difference_of_medians, peak_mib, time_interleaved


class _Rotation:
    """Cycles through the input sets, one per call."""

    def __init__(self, n: int) -> None:
        self.n, self.i = n, -1

    def __call__(self) -> int:
        self.i = (self.i + 1) % self.n
        return self.i


def _prepare(v: Variant, mode: str, sets: list[InputSet]) -> tuple[Callable[[], object], list, str]:
    """(the timed call, tensors whose grads it resets, how backward is timed); runs the call
    once, and raises when it fails or, in forward, gives a non-finite output."""
    nxt = _Rotation(len(sets))
    leaves = v.params + [s.x for s in sets if s.x.requires_grad]
    if mode == "forward":
        def fwd():
            with torch.no_grad():
                return v.fn(sets[nxt()])

        if not bool(torch.isfinite(fwd()).all()):
            raise FloatingPointError("non-finite output")
        return fwd, [], ""
    if mode == "full":
        def full():
            s = sets[nxt()]
            torch.autograd.backward(v.fn(s), s.dy)

        full()
        return full, leaves, ""
    ys = [v.fn(s) for s in sets]  # backward alone: one graph per input set, kept between runs
    for _ in range(2):
        torch.autograd.backward(ys[0], sets[0].dy, retain_graph=True)

    def bwd():
        i = nxt()
        torch.autograd.backward(ys[i], sets[i].dy, retain_graph=True)

    bwd.graphs = ys  # freed with the function
    return bwd, leaves, "retain_graph"


def _peak(v: Variant, mode: str, s: InputSet, device: torch.device) -> Optional[float]:
    """Peak memory of one call over what is allocated before it (for backward, the graph too)."""
    if device.type != "cuda":
        return None
    leaves = v.params + [s.x]
    for p in leaves:
        p.grad = None
    if mode == "forward":
        def call():
            with torch.no_grad():
                return v.fn(s)
    elif mode == "full":
        def call():
            torch.autograd.backward(v.fn(s), s.dy)
    else:
        y = v.fn(s)

        def call():
            torch.autograd.backward(y, s.dy)
    out = peak_mib(call, device)
    for p in leaves:
        p.grad = None
    return out


def run_op_case(case: OpCase, device: torch.device, dtype: torch.dtype, dtype_name: str, backends: dict,
                modes: Sequence[str] = ("forward",), rounds: int = 7, budget_ms: Optional[float] = None,
                compile_ok: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """Rows of one op case: every variant in every mode (one row each; a failing variant's
    rows carry its error, the others still run)."""
    import proper_kernels

    torch.manual_seed(0)
    layer = cast_layer(make_layer(case, device, dtype), dtype)
    grad = any(m != "forward" for m in modes)
    sets = make_inputs(case, num_input_sets(case, device, dtype), device, dtype, grad=grad)
    variants = make_variants(layer, backends, compile_ok)
    with torch.no_grad():  # the experts some token picks, for the bytes of a forward
        used = [len(set(proper_call(layer, "torch", s, return_routing=True)[1].indices.reshape(-1).tolist()))
                for s in sets]
    experts_used = sum(used) / len(used)
    errors: dict[str, str] = {}
    timings: dict[str, dict[str, Timing]] = {v.name: {} for v in variants}
    how: dict[tuple, str] = {}
    peaks: dict[tuple, Optional[float]] = {}

    def fail(v: Variant, mode: str, e: BaseException) -> None:
        errors.setdefault(v.name, f"{mode}: {type(e).__name__}: {e}")
        log(f"ERROR: {case.label} {mode} {v.name}: {type(e).__name__}: {e}")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def time_group(group: list[Variant], mode: str) -> None:
        fns, grads = {}, {}
        for v in group:
            try:
                fns[v.name], grads[v.name], how[(v.name, mode)] = _prepare(v, mode, sets)
            except Exception as e:  # noqa: BLE001 - a broken variant is reported, the others run
                prev = timings[v.name]
                if mode == "backward" and isinstance(e, RuntimeError) and "forward" in prev and "full" in prev:
                    timings[v.name][mode] = difference_of_medians(prev["full"], prev["forward"])
                    how[(v.name, mode)] = f"full_minus_forward ({type(e).__name__})"
                else:
                    fail(v, mode, e)
            if v.backend == "auto" and mode == "forward" and v.name in fns:
                v.backend = proper_kernels.last_backend("proper_linear") or "auto"
        try:
            timings_now = time_interleaved(fns, device, rounds, budget_ms=budget_ms, grads=grads)
        except Exception as e:  # noqa: BLE001
            for v in group:
                if v.name in fns:
                    fail(v, mode, e)
            timings_now = {}
        fns.clear()  # frees the backward graphs
        for name, t in timings_now.items():
            timings[name][mode] = t
        for v in group:
            if v.name in timings_now:
                try:
                    peaks[(v.name, mode)] = _peak(v, mode, sets[0], device)
                except Exception as e:  # noqa: BLE001
                    fail(v, mode, e)

    for mode in (m for m in TIMING_ORDER if m in modes):
        live = [v for v in variants if v.name not in errors]
        if device.type == "cuda":  # timed one after the other anyway: hold one variant's graphs at a time
            for v in live:
                time_group([v], mode)
        else:
            time_group(live, mode)
        log(f"op {case.label:24s} {mode:8s} " + ", ".join(
            f"{v.name} {timings[v.name][mode].median_ms:.3f} ms" for v in variants if mode in timings[v.name]))
    rows = []
    el = dtype.itemsize
    for mode in (m for m in MODES if m in modes):
        for v in variants:
            t = timings[v.name].get(mode)
            op = v.name != "linear"
            fwd = mode == "forward"
            rows.append(make_row(
                "op", case.sweep, case.label, v.name, device, dtype_name, case.shape(), v.backend, mode, t,
                peak=peaks.get((v.name, mode)), flops=case.flops(op) if fwd else None,
                nbytes=case.min_bytes(el, experts_used, op) if fwd else None, tokens=case.tokens,
                backward_method=how.get((v.name, mode)) or None, input_sets=len(sets),
                error=None if t is not None else errors.get(v.name, "not timed"), notes=v.notes))
    return rows


def release(device: torch.device) -> None:
    """Free what the last case held (call after run_op_case has returned)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_op(device: torch.device, dtype: torch.dtype, dtype_name: str, quick: bool, rounds: int, compile_ok: bool,
           log: Callable[[str], None], budget_ms: Optional[float] = None) -> list[dict]:
    """``proper bench``'s op level: the sweeps of op_cases, forward, backend auto."""
    backends = {"proper": "auto"}
    if device.type == "cuda":
        backends["proper-torch"] = "torch"
    rows = []
    for case in op_cases(device, quick):
        rows += run_op_case(case, device, dtype, dtype_name, backends, ("forward",), rounds, budget_ms, compile_ok,
                            log)
        release(device)
    return rows
