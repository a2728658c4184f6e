"""The one timer of the benchmarks, and the device peaks measured next to it.

On the CPU: time.perf_counter over interleaved rounds (every function of a group once per
round, in a rotating order, after warm-up), so that load on a shared machine hits every
variant alike; the median and the 20th/80th percentiles, and the per-round times, which
:func:`paired_overhead` pairs round by round.

On CUDA: CUDA events through ``triton.testing.do_bench`` (warm-up, the L2 cache flushed
before each run, median and percentiles); the number of runs is sized from a first estimate
so that each function is timed for about ``budget_ms`` (at least ``rounds`` runs).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Optional, Sequence

import torch
from torch import Tensor

CPU_TIMER = "time.perf_counter, variants interleaved per round after warm-up rounds, median/p20/p80"
CUDA_TIMER = "CUDA events via triton.testing.do_bench (warm-up, L2 flushed before each run), median/p20/p80"
CUDA_BUDGET_MS = 300.0


def timer_description(device: torch.device) -> str:
    return CUDA_TIMER if device.type == "cuda" else CPU_TIMER


@dataclass
class Timing:
    median_ms: float
    p20_ms: Optional[float]
    p80_ms: Optional[float]
    reps: int
    times_ms: list = field(default_factory=list, repr=False)  # per round, in round order (CPU)


def _quantiles(times: Sequence[float]) -> Timing:
    q = torch.tensor(list(times), dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return Timing(float(q[0]), float(q[1]), float(q[2]), len(times), list(times))


def paired_overhead(t: Timing, base: Timing) -> Timing:
    """The per-round differences t - base (same round, so machine load mostly cancels);
    on CUDA, where rounds are not paired, the difference of the medians."""
    if t.times_ms and len(t.times_ms) == len(base.times_ms):
        return _quantiles([a - b for a, b in zip(t.times_ms, base.times_ms)])
    d = t.median_ms - base.median_ms
    return Timing(d, d, d, t.reps)


def difference_of_medians(t: Timing, base: Timing) -> Timing:
    """t - base from separate runs: the median's difference only (the spread of a difference
    is not the difference of spreads, so the percentiles are left unknown)."""
    return Timing(t.median_ms - base.median_ms, None, None, 0)


def resolved_at_noise(d: Timing) -> bool:
    """Whether a paired difference is told apart from zero: its p20..p80 spread is on one side."""
    return d.p20_ms > 0 or d.p80_ms < 0


def describe_overhead(d: Timing) -> str:
    if resolved_at_noise(d):
        return f"{d.median_ms:.1f} ms"
    return f"not resolved at this noise ({d.p20_ms:.1f}..{d.p80_ms:.1f} ms)"


def _reset(params: Sequence[Tensor]) -> None:
    for p in params:
        p.grad = None


def _time_cuda(fn: Callable[[], object], device: torch.device, rounds: int, budget_ms: float,
               params: Sequence[Tensor]) -> Timing:
    import triton.testing

    _reset(params)
    fn()  # compilation, allocator, handles
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    est = max(start.elapsed_time(end) / 3, 1e-3)
    reps = int(min(2000, max(rounds, budget_ms / est)))
    med, p20, p80 = triton.testing.do_bench(fn, warmup=max(25.0, 2 * est), rep=reps * est,
                                            grad_to_none=list(params) or None, quantiles=[0.5, 0.2, 0.8])
    return Timing(float(med), float(p20), float(p80), reps)


def time_interleaved(fns: Mapping[Hashable, Callable[[], object]], device: torch.device, rounds: int,
                     warmup: int = 2, *, budget_ms: Optional[float] = None,
                     grads: Optional[Mapping[Hashable, Sequence[Tensor]]] = None) -> dict[Hashable, Timing]:
    """Time every function of `fns` (ms), keyed as `fns` is (a name, or a (variant, mode)
    pair): per-function quantiles, see the module docstring.

    grads: name -> tensors whose ``.grad`` is reset before every run, outside the timed part."""
    grads = grads or {}
    if device.type == "cuda":
        return {n: _time_cuda(fn, device, rounds, budget_ms or CUDA_BUDGET_MS, grads.get(n, ()))
                for n, fn in fns.items()}
    import time

    names = list(fns)
    for _ in range(warmup):
        for n in names:
            _reset(grads.get(n, ()))
            fns[n]()
    times: dict[Hashable, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            _reset(grads.get(n, ()))
            t0 = time.perf_counter()
            fns[n]()
            times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: _quantiles(t) for n, t in times.items()}


def capture_graph(fn: Callable[[], object], device: torch.device, warmup: int = 2):
    """`fn` captured in a CUDA graph over its static inputs: (graph, its static output).
    It runs `warmup` times on a side stream first (allocator, autograd and JIT state), as
    torch.cuda.graph requires; ``graph.replay()`` then reruns it on the same memory."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def peak_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory of one call of fn over the memory allocated just before it (CUDA only)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / 2**20


def measure_peaks(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    """The device's achievable matmul TFLOP/s and copy GB/s (read + write), measured now."""
    n = 1024 if (quick or device.type == "cpu") else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    m = 16 << 20 if device.type == "cpu" else 256 << 20
    src = torch.randn(m, device=device)
    dst = torch.empty_like(src)
    t = time_interleaved({"mm": lambda: a @ b, "copy": lambda: dst.copy_(src)}, device, 9 if quick else 25)
    return {"matmul_tflops": 2 * n**3 / (t["mm"].median_ms * 1e-3) / 1e12,
            "matmul": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')} matmul, median",
            "copy_gbps": 2 * m * 4 / (t["copy"].median_ms * 1e-3) / 1e9,
            "copy": f"copy_ of {m * 4 >> 20} MiB fp32 (read + write), median"}


class HostSyncError(RuntimeError):
    """A host sync inside a region that must not have one (see :func:`no_host_sync`)."""


# The Tensor methods that read a value on the host, so that on CUDA they wait for the device.
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def no_host_sync(device: torch.device):
    """Raise HostSyncError on a host sync inside the block.

    On CUDA this is ``torch.cuda.set_sync_debug_mode("error")``, which catches every sync,
    inside torch's ops too. On the CPU nothing syncs, so the block instead refuses the
    Python-level reads that would sync on a GPU (``item``, ``tolist``, ``bool``/``int``/
    ``float`` of a tensor, ``.cpu()``, ``.numpy()``, ``torch.cuda.synchronize``): the same
    code then fails here as it would under the debug mode there (a sync inside torch's C++
    ops, such as ``nonzero``, is seen only on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        except RuntimeError as e:
            if "synchroniz" in str(e):
                raise HostSyncError(str(e)) from e
            raise
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return
    saved = {n: getattr(torch.Tensor, n) for n in _HOST_READS}
    saved_sync = torch.cuda.synchronize

    def refuse(name):
        def f(*args, **kwargs):
            raise HostSyncError(f"Tensor.{name}() reads a value on the host: a host sync on a GPU")
        return f

    try:
        for n in _HOST_READS:
            setattr(torch.Tensor, n, refuse(n))
        torch.cuda.synchronize = refuse("cuda.synchronize")
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        torch.cuda.synchronize = saved_sync
