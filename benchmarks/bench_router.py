"""Speed of the standalone ``proper_kernels.router_topk`` op: softmax(logits / temperature),
top-k, renormalised gates, for a user's own mixture-of-experts layer. A thin script on the
harness of ``proper bench`` (proper/apps/bench): the same timer, the same row schema.

    python -m benchmarks.bench_router [--device cuda|cpu] [--dtype bf16|fp16|fp32] [--quick] [--out FILE.json]

Variants: ``proper-<b>`` for every backend b of cuda, triton and torch that runs on the
device. ``proper-torch`` is the eager PyTorch reference (softmax, top-k and renormalising
as separate torch ops, as a user's own layer would do them): it is this op's floor, so every
row's ``ratio_to_floor`` compares it with that (there is no PEFT baseline for a router). Cases: tokens in (64, 8192) x experts
in (8, 64, 256), top-2; ``--quick`` (implied by ``--device cpu``) shrinks the tokens. Modes:
forward, and full (forward plus the backward of the gates). Every row carries the bytes the op
must move (logits in, gates and indices out; for full, the logits' gradient too).

Correctness is not checked here: tests/test_triton_router.py and tests/test_cuda_ops.py check
every backend against the float64 reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import proper_kernels
from proper.apps.bench import (DTYPES, available_backends, default_rounds, finish_rows, header, markdown,
                               measure_peaks, resolve_device, settings, slug, write)
from proper.apps.bench.schema import make_row
from proper.apps.bench.timing import time_interleaved

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TOP_K = 2


def cases(quick: bool) -> list[tuple[int, int]]:
    tokens = (16, 256) if quick else (64, 8192)
    return [(t, e) for t in tokens for e in (8, 64, 256)]


def op_bytes(tokens: int, experts: int, itemsize: int, mode: str) -> int:
    once = tokens * experts * itemsize + tokens * TOP_K * (itemsize + 8)  # logits in; gates, int64 indices out
    return once + (tokens * experts * itemsize + tokens * TOP_K * itemsize if mode == "full" else 0)


def run_case(tokens: int, experts: int, device, dtype, dtype_name: str, backends: dict, rounds: int,
             budget_ms: Optional[float]) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(tokens * 1000 + experts)
    logits = torch.randn(tokens, experts, generator=g).to(device=device, dtype=dtype)
    leaf = logits.clone().requires_grad_(True)
    dgates = torch.randn(tokens, TOP_K, generator=g).to(device=device, dtype=dtype)
    fns, grads = {}, {}
    for variant, backend in backends.items():
        def forward(b=backend):
            with torch.no_grad():
                return proper_kernels.router_topk(logits, TOP_K, backend=b)

        def full(b=backend):
            gates, _ = proper_kernels.router_topk(leaf, TOP_K, backend=b)
            gates.backward(dgates)

        fns[(variant, "forward")], fns[(variant, "full")] = forward, full
        grads[(variant, "full")] = [leaf]
    timed = time_interleaved(fns, device, rounds, budget_ms=budget_ms, grads=grads)
    shape = {"tokens": tokens, "experts": experts, "top_k": TOP_K}
    rows = [make_row("router", "tokens x experts", f"T={tokens} E={experts}", variant, device, dtype_name, shape,
                     backends[variant], mode, t, nbytes=op_bytes(tokens, experts, logits.element_size(), mode),
                     tokens=tokens)
            for (variant, mode), t in timed.items()]
    for r in rows:  # the eager torch reference is this op's floor
        r["kind"] = "floor" if r["variant"] == "proper-torch" else r["kind"]
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_router", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--quick", action="store_true", help="fewer tokens (always on for --device cpu)")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/router-<device>-<date>.json)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds on the CPU, the fewest runs on CUDA")
    p.add_argument("--budget-ms", type=float, default=None, help="time per measurement on CUDA, in ms (default 300)")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 2
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    quick = args.quick or device.type == "cpu"
    rounds = args.repeats or default_rounds(device, quick)
    backends, notes = available_backends(device, dtype)
    t0 = time.time()
    peaks = measure_peaks(device, dtype, quick)
    command = "python -m benchmarks.bench_router " + " ".join(sys.argv[1:] if argv is None else argv)
    result = header(device, settings(device, quick, rounds, dtype_name, False, None, ("router",), args.budget_ms),
                    peaks, command, notes + ["proper-torch (the eager PyTorch reference) is the floor: ratio_to_floor "
                                             "compares every row with it"])
    rows = []
    for tokens, experts in cases(quick):
        rows += run_case(tokens, experts, device, dtype, dtype_name, backends, rounds, args.budget_ms)
    result["rows"] = finish_rows(rows, peaks)
    result["seconds"] = time.time() - t0
    out = args.out or RESULTS_DIR / f"router-{slug(result['device']['name'])}-{result['date']}.json"
    files = write(result, out)
    print(f"wrote {files[0]} and {files[1]}", file=sys.stderr)
    print(markdown(result), end="", flush=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
