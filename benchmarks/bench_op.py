"""Speed and peak memory of ONE ProperLinear layer call (the op) on the goal cases, in
every mode, side by side with its floor and the PEFT-style layer: a thin script on the
harness of ``proper bench`` (proper/apps/bench), writing the same schema.

    python -m benchmarks.bench_op [--device cuda|cpu] [--dtype bf16|fp16|fp32] [--quick] [--out FILE.json]
                                  [--repeats N] [--budget-ms MS]

Variants: ``linear`` (the floor), ``proper-<b>`` for every backend b of cuda, triton and
torch that runs on the device (a skipped one is named in the header's notes), ``peft-moe``
(proper.apps.bench.PeftStyleLayer). Cases (proper.apps.bench.goal_cases): ``prefill`` and
``decode``; ``--quick`` (implied by ``--device cpu``) shrinks them. Modes: forward, backward
(on graphs built beforehand), full. Every forward row carries the fewest bytes the call must
move, the bandwidth that implies and its share of the copy bandwidth measured in the same
run (the header's ``peaks``): the figure that matters for decode.

Correctness is not checked here: tests/test_bench_oracle.py checks every variant against a
float64 reference. A variant that fails or gives a non-finite output is reported in its rows
(``ok: false`` and ``error``) and makes the exit status 1.

Writes the JSON to --out (default benchmarks/results/op-<device>-<date>.json) and the
markdown table next to it (.md), and prints the table last.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from proper.apps.bench import (DTYPES, available_backends, default_rounds, finish_rows, goal_cases, header,
                               markdown, measure_peaks, resolve_device, run_op_case, settings, slug, write)
from proper.apps.bench.op import MODES
from proper.apps.bench.op_run import release

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_op", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="timed dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--quick", action="store_true", help="small shapes (always on for --device cpu)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default benchmarks/results/op-<device>-<date>.json); the table goes next to it (.md)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds on the CPU, the fewest runs on CUDA")
    p.add_argument("--budget-ms", type=float, default=None, help="time per measurement on CUDA, in ms (default 300)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        log(str(e))
        return 2
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    quick = args.quick or device.type == "cpu"
    rounds = args.repeats or default_rounds(device, quick)
    torch.manual_seed(0)
    backends, notes = available_backends(device, dtype)
    if quick and device.type == "cpu" and not args.quick:
        notes.append("--device cpu implies --quick (small shapes)")
    t0 = time.time()
    peaks = measure_peaks(device, dtype, quick)
    command = "python -m benchmarks.bench_op " + " ".join(sys.argv[1:] if argv is None else argv)
    result = header(device, settings(device, quick, rounds, dtype_name, False, "no proper-compile rows at the goal "
                                     "cases", ("op",), args.budget_ms), peaks, command, notes)
    log(f"{result['device']['name']}: copy {peaks['copy_gbps']:.0f} GB/s; backends {list(backends.values())}")
    rows = []
    for case in goal_cases(quick):
        rows += run_op_case(case, device, dtype, dtype_name, backends, MODES, rounds, args.budget_ms, log=log)
        release(device)
    result["rows"] = finish_rows(rows, peaks)
    result["seconds"] = time.time() - t0
    out = args.out or RESULTS_DIR / f"op-{slug(result['device']['name'])}-{result['date']}.json"
    files = write(result, out)
    log(f"wrote {files[0]} and {files[1]}")
    print(markdown(result), end="", flush=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
