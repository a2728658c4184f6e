"""Every CUDA kernel and the Triton op (dense and grouped, fp32 and bf16) on one case,
checked against the float64 reference: the script that compute-sanitizer runs on a GPU.

    python -m benchmarks.gpu_check [--size small|tiles] [--cuda-only] [--rows FILE]

Sizes: ``small`` is one partial tile of everything (37 tokens, 72 in, 45 out); ``tiles`` has
at least two tiles, the last one partial, in every dimension a kernel tiles (``SIZES``).
Exits 1 on a wrong result, 2 without a GPU or the built extension. Each check prints a line
and writes a row (``--rows``, benchmarks/rows.py); the last line is ``summary: ...``.

:func:`sanitizer_argv` is the command line to run it under compute-sanitizer: memcheck over
our kernels only (the CUDA extension's and the Triton op's, by kernel-name filter) without
torch's caching allocator, or racecheck over the CUDA kernels that use block-shared memory.

CUDA kernels covered: the decode kernels (inference, few tokens), the four tensor-core
prefill kernels (training: forward and backward; inference in place), the BGMV kernels
(shapes wider than the tensor-core kernels hold) and router_topk forward/backward, in fp32,
fp16 and bf16."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from typing import Callable, Optional

import torch

from benchmarks.rows import RowSink, summary

TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TRAINED = ("x", "lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")

# The tiles (csrc/tc.cuh, csrc/prefill.cuh, csrc/decode.cuh, csrc/kernels.cuh; the sm_90 rows
# of proper_kernels/launch.py CONFIGS):
#   tokens: 64 a CUDA prefill tile; Triton BLOCK_T 64 (bf16) or 32 (fp32) past 256 tokens,
#           16 up to 256; 64 (token, slot) pairs a grouped block; 4 a router_topk CTA.
#   in:     32 a CUDA shrink step, 128 a CUDA bwd_dx CTA; Triton BLOCK_K 32-128; the decode
#           kernels split the features in 2 from 512 on (at most 132 tokens on an H100).
#   out:    128 a CUDA expand CTA, 256 a decode or BGMV expand CTA; Triton BLOCK_N 32-128.
#   expert columns E*r: 32 a Triton fp32 dot.
# "tiles" (300 tokens, 520 in, 328 out, E*r = 36) has at least two of each, the last one
# partial; its decode check takes 100 tokens (the decode kernels run up to 256).
SIZES = {
    "small": dict(T=37, d_in=72, d_out=45, E=6, k=2, r=4, r_u=3, N=5),
    "tiles": dict(T=300, d_in=520, d_out=328, E=6, k=2, r=6, r_u=3, N=11),
}
DECODE_TOKENS = {"small": 37, "tiles": 100}

# -- compute-sanitizer ------------------------------------------------------------------------
#
# Filters (compute-sanitizer's "Specifying Filters"): `--kernel-name KEY=VALUE` checks only
# the kernels whose mangled name matches; the option may be given many times and a kernel
# matching any of them is checked, so each kernel gets its own. `kns=` is a substring of the
# mangled name, `kne=` the whole name.
# - The CUDA extension's kernels are C++ templates in namespaces, mangled as
#   _ZN6proper2pf21prefill_shrink_kernelI13__nv_bfloat16EEvNS_12ShrinkLaunchE: the filter
#   is the identifier with its length, as the mangling spells it (kns=21prefill_shrink_kernel).
# - A Triton kernel's name in its cubin is its Python function's name, unmangled
#   (.entry _shrink): kne=_shrink, so no torch kernel that merely contains it is checked.
# The option is --kernel-name from compute-sanitizer 2023.3 (CUDA 12.3) on; before, it was
# --kernel-regex.
SANITIZER = "compute-sanitizer"
ERROR_EXITCODE = 3
PADDING = 65536  # bytes of poison after every allocation: a read up to 64 KiB past a tensor is caught
SANITIZER_ENV = "PROPER_SANITIZER"  # set by sanitizer_argv: the rows say under which tool they ran

# Every __global__ kernel of csrc/ (tests/test_gpu_check.py keeps the list equal to csrc/).
CUDA_KERNELS = (
    "router_topk_fwd_kernel", "router_topk_bwd_kernel", "bgmv_shrink_kernel", "bgmv_expand_kernel",
    "decode_router_kernel", "decode_shrink_kernel", "decode_expand_kernel",
    "prefill_shrink_kernel", "prefill_expand_kernel", "prefill_bwd_dh_kernel", "prefill_bwd_dx_kernel",
    "fill_kernel",
)
# The kernels that declare block-shared memory (__shared__, or the dynamic buffer
# PROPER_DYNAMIC_SMEM): racecheck's. Not decode_router_kernel (warp shuffles only) nor
# fill_kernel. The test checks this list against csrc/ both ways.
SHARED_MEMORY_KERNELS = (
    "router_topk_fwd_kernel", "router_topk_bwd_kernel", "bgmv_shrink_kernel", "bgmv_expand_kernel",
    "decode_shrink_kernel", "decode_expand_kernel",
    "prefill_shrink_kernel", "prefill_expand_kernel", "prefill_bwd_dh_kernel", "prefill_bwd_dx_kernel",
)
# Every Triton kernel proper_kernels.triton_* launches (the test checks it against the launch
# calls of those modules and against the launches of this script's cases).
TRITON_KERNELS = (
    "_shrink", "_route", "_expand", "_bwd_dh", "_bwd_dx", "_wgrad_in", "_wgrad_out",  # dense
    "_shrink_wide", "_bwd_dh_wide", "_segment_gemm",  # grouped (and _shrink, _expand, _bwd_dh, _bwd_dx)
    "_router_topk_fwd_kernel", "_router_topk_bwd_kernel",  # the standalone router op
)


def cuda_filter(kernel: str) -> str:
    """The kernel-name filter of a CUDA kernel: its identifier as its mangled name spells it."""
    return f"kns={len(kernel)}{kernel}"


def sanitizer_argv(tool: str, size: str, cuda_only: bool) -> tuple[list[str], dict]:
    """(command line, extra environment) that runs this script under compute-sanitizer.

    memcheck: our kernels only (every CUDA kernel, and the Triton kernels unless `cuda_only`),
    with torch's caching allocator off (PYTORCH_NO_CUDA_MEMORY_CACHING=1), so each tensor is
    its own allocation, and PADDING bytes after each, so a read or write past a tensor is
    out of bounds instead of landing in a neighbour inside a pooled segment.
    racecheck: the CUDA kernels that use block-shared memory (Triton's are not checked).
    The tool's report goes to stdout with the script's, into the caller's log; the exit
    status is ERROR_EXITCODE when the script passed but the tool found errors. Append
    ``--rows FILE`` to the command line for the rows."""
    if tool not in ("memcheck", "racecheck"):
        raise ValueError(f"tool must be 'memcheck' or 'racecheck', got {tool!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    argv = [SANITIZER, "--tool", tool, "--error-exitcode", str(ERROR_EXITCODE),
            "--target-processes", "application-only"]  # the python process, not Triton's ptxas
    env = {SANITIZER_ENV: tool}
    if tool == "memcheck":
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
        # no reports of CUDA API calls that fail on purpose (torch and Triton probe the
        # driver): the exit status is about the kernels
        argv += ["--padding", str(PADDING), "--report-api-errors", "no"]
        kernels = [cuda_filter(k) for k in CUDA_KERNELS]
        if not cuda_only:
            kernels += [f"kne={k}" for k in TRITON_KERNELS]
    else:
        kernels = [cuda_filter(k) for k in SHARED_MEMORY_KERNELS]
    for f in kernels:
        argv += ["--kernel-name", f]
    argv += [sys.executable, "-m", "benchmarks.gpu_check", "--size", size] + (["--cuda-only"] if cuda_only else [])
    return argv, env


# -- the checks ---------------------------------------------------------------------------------

def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_case(dev, size: str = "small", T: Optional[int] = None) -> dict:
    """The inputs of one call at `size` (SIZES), with `T` tokens if given; seeded."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    s = dict(SIZES[size], **({"T": T} if T is not None else {}))
    T, d_in, d_out, E, r, r_u, N = (s[n] for n in ("T", "d_in", "d_out", "E", "r", "r_u", "N"))
    # weights scaled so that products over `in` and over `out` have the small case's size
    # (fp16 gradients of the tiles case would overflow otherwise); 1 for the small case
    a = (SIZES["small"]["d_in"] / d_in) ** 0.5
    b = (SIZES["small"]["d_out"] / d_out) ** 0.5
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=dev, generator=g)  # noqa: E731
    return dict(
        x=rnd(T, d_in), base_out=rnd(T, d_out), lora_A=rnd(E, r, d_in) * (0.5 * a),
        lora_B=rnd(E, d_out, r) * (0.5 * b), scaling=1.5, top_k=s["k"], temperature=0.8, router_x=rnd(E, d_in) * a,
        router_user=rnd(N + 1, E), router_h=rnd(E, r_u), user_ids=torch.randint(-1, N, (T,), device=dev, generator=g),
        user_A=rnd(N, r_u, d_in) * (0.5 * a), user_B=rnd(N, d_out, r_u) * (0.5 * b), user_scaling=0.5)


def rel_error(a, b) -> float:
    """The largest difference of `a` from `b`, relative to `b`'s largest magnitude (0 when
    both are empty)."""
    if b.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-30))


def cast(case: dict, dtype: torch.dtype) -> tuple[dict, dict]:
    """(the case's floating tensors in `dtype`, the same values in float64: the reference's
    inputs); other entries as they are."""
    low = {n: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in case.items()}
    hi = {n: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in low.items()}
    return low, hi


def errors(fn, case, dtype, train=True, **kw):
    """Relative errors of y (and of every gradient when `train`) against the reference."""
    from proper_kernels import reference

    low, hi = cast(case, dtype)
    if not train:
        with torch.no_grad():
            y, routing = fn(**dict(low, **kw))
        y64, r64 = reference.proper_linear(**hi)
        _sync()
        return {"y": rel_error(y, y64), "gates": rel_error(routing.gates, r64.gates)}
    # the loss is a mean over the tokens, so that fp16 gradients of many tokens stay in range
    T = case["x"].shape[0]
    ins = {n: low[n].clone().requires_grad_(True) for n in TRAINED}
    y, routing = fn(**dict(low, **ins, **kw))
    ((y.float().square().sum() + routing.logits.float().sum() + routing.gates.float().sum()) / T).backward()
    ins64 = {n: hi[n].clone().requires_grad_(True) for n in TRAINED}
    y64, r64 = reference.proper_linear(**dict(hi, **ins64))
    ((y64.square().sum() + r64.logits.sum() + r64.gates.sum()) / T).backward()
    _sync()
    out = {"y": rel_error(y, y64)}
    out.update({n: rel_error(ins[n].grad, ins64[n].grad) for n in TRAINED})
    return out


def worst_of(errs: dict) -> float:
    """The largest error; NaN if any is NaN (a plain max() may skip it)."""
    return max(errs.values(), key=lambda e: math.inf if math.isnan(e) else e)


def report(name, errs, tol) -> bool:
    worst = worst_of(errs)
    print(f"{name}: worst {worst:.2e} (tol {tol:.0e}): " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()),
          flush=True)
    return worst <= tol


class Checks:
    """Runs named checks: prints each, writes its row to `sink`, keeps the tally."""

    def __init__(self, sink: RowSink, size: str, cuda_only: bool = False):
        self.sink, self.size, self.cuda_only = sink, size, cuda_only
        self.rows: list[dict] = []

    def run(self, name: str, dtype: torch.dtype, measure: Callable[[], dict]) -> bool:
        """One check: `measure()` gives the relative errors; within TOL[dtype] is ok. An
        exception (a kernel fault under memcheck, say) is a failed check, and the next runs."""
        tol, label = TOL[dtype], f"{name} {DTYPE_NAMES[dtype]}"
        row = dict(name=name, dtype=DTYPE_NAMES[dtype], size=self.size, cuda_only=self.cuda_only,
                   sanitizer=os.environ.get(SANITIZER_ENV), tol=tol)
        try:
            errs = measure()
            ok = report(label, errs, tol)  # a NaN error fails it
            row.update(worst=worst_of(errs), ok=ok, errors=errs)
        except Exception as e:  # noqa: BLE001  (reported in the row; the other checks still run)
            print(f"{label}: FAILED with {type(e).__name__}: {e}", flush=True)
            row.update(worst=None, ok=False, error=f"{type(e).__name__}: {e}"[:500])
        self.sink.write(row)
        self.rows.append(row)
        return row["ok"]

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r["ok"] for r in self.rows)

    def summary(self) -> str:
        bad = [f"{r['name']} {r['dtype']}" for r in self.rows if not r["ok"]]
        text = f"{self.size}{' CUDA only' if self.cuda_only else ''}: {len(self.rows) - len(bad)}/{len(self.rows)}"
        text += " checks ok"
        closest = max((r for r in self.rows if r["ok"]), key=lambda r: r["worst"] / r["tol"], default=None)
        if closest is not None:
            text += (f"; closest to its tolerance: {closest['name']} {closest['dtype']} at "
                     f"{closest['worst'] / closest['tol']:.2f}x")
        return text + (f"; failing: {', '.join(bad)}" if bad else "")


@contextlib.contextmanager
def _setting(module, name: str, value):
    """`module.name` = `value` inside the block."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def cuda_checks(dev, checks: Checks) -> bool:
    """Every CUDA kernel through the cuda backend, in fp32, fp16 and bf16."""
    from proper_kernels import cuda_backend, reference

    case = make_case(dev, checks.size)
    decode = make_case(dev, checks.size, T=DECODE_TOKENS[checks.size])
    fn = cuda_backend.proper_linear
    ok = True
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ok &= checks.run("cuda decode", dtype, lambda: errors(fn, decode, dtype, train=False))
        ok &= checks.run("cuda tensor-core training", dtype, lambda: errors(fn, case, dtype))
        with _setting(cuda_backend, "DECODE_MAX_TOKENS", 0):
            ok &= checks.run("cuda tensor-core inference in place", dtype,
                             lambda: errors(fn, case, dtype, train=False, inplace=True))
        with _setting(cuda_backend, "PREFILL_MAX_COLUMNS", 0):
            ok &= checks.run("cuda BGMV training", dtype, lambda: errors(fn, case, dtype))

        def router():
            logits = (case["x"][:, :16] * 3).to(dtype).requires_grad_(True)
            gates, _ = cuda_backend.router_topk(logits, 3, 0.7)
            ref_in = logits.detach().double().requires_grad_(True)
            g64, _ = reference.router_topk(ref_in, 3, 0.7)
            gates.double().square().sum().backward()
            g64.square().sum().backward()
            _sync()
            return {"gates": rel_error(gates, g64), "dlogits": rel_error(logits.grad, ref_in.grad)}

        ok &= checks.run("cuda router_topk", dtype, router)
    return ok


def triton_checks(dev, checks: Checks) -> bool:
    """The Triton op, both strategies, fp32 and bf16: forward and every gradient."""
    from proper_kernels import triton_linear

    case = make_case(dev, checks.size)
    ok = True
    for strategy in ("dense", "grouped"):
        fn = lambda strategy=strategy, **kw: triton_linear.proper_linear(**kw, strategy=strategy)  # noqa: E731
        for dtype in (torch.float32, torch.bfloat16):
            ok &= checks.run(f"triton {strategy}", dtype, lambda: errors(fn, case, dtype))
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="small",
                   help="small: one partial tile; tiles: at least two tiles in every tiled dimension")
    p.add_argument("--cuda-only", action="store_true", help="only the CUDA extension's kernels")
    p.add_argument("--rows", metavar="FILE", help="append one JSON row per check to FILE")
    args = p.parse_args(argv)
    tool = os.environ.get(SANITIZER_ENV)
    sink = RowSink(args.rows, f"{tool}-{args.size}" if tool else "gpu_check")
    import proper_kernels

    why = None if torch.cuda.is_available() else "no CUDA GPU"
    why = why or proper_kernels.cuda_extension_error()
    if why:
        print("needs a CUDA GPU and the built extension:", why)
        summary(f"not run: {why}"[:300])
        return 2
    checks = Checks(sink, args.size, args.cuda_only)
    cuda_checks("cuda", checks)
    if not args.cuda_only:
        triton_checks("cuda", checks)
    print("gpu_check:", "ok" if checks.ok else "FAILED")
    summary(checks.summary())
    return 0 if checks.ok else 1


if __name__ == "__main__":
    sys.exit(main())
