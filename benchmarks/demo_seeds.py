"""`proper demo` over several seeds and torch thread counts: the demo table's mean and
minimum of every cell, the ARI of stage 2's groups, and the wall time of each run.

    python -m benchmarks.demo_seeds [--seeds 0 1 2 3 4] [--threads 1 2] [--avx2] [--out DIR]

Each run is a fresh `proper demo` in its own process, with OMP_NUM_THREADS and
MKL_NUM_THREADS set to the thread count, in a temporary directory. The thread count
changes the order of float sums, so the runs differ the way two CPUs do. Writes
DIR/demo-seeds-<date>.json (every run's whole table) and .md (the runs, then the summary,
and the machine they ran on). The README's demo table is this file's summary.

``--avx2`` runs torch's and MKL's AVX2 kernels on an AVX-512 machine (ATEN_CPU_CAPABILITY,
MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA), the rounding of a CPU without AVX-512; the
files are then named demo-seeds-avx2-<date>.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from proper.apps.bench import device_name, versions

RUN = """
import json, sys
from proper.apps.demo import DemoConfig, run
r = run(sys.argv[1], DemoConfig(seed=int(sys.argv[2]), progress=False), log=lambda line: None)
json.dump(r, open(sys.argv[3], "w"))
"""


def cpu_isa() -> str:
    """The widest x86 vector extension this CPU has (float rounding in BLAS follows it)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = set(flags.split(":", 1)[1].split())
    return next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")) if flag in have),
                "no AVX")


AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def run_one(seed: int, threads: int, work: Path, avx2: bool = False) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(AVX2 if avx2 else {})}
    out, result = work / f"seed{seed}-threads{threads}", work / f"seed{seed}-threads{threads}.json"
    subprocess.run([sys.executable, "-c", RUN, str(out), str(seed), str(result)], env=env, check=True)
    r = json.loads(result.read_text())
    return {"seed": seed, "threads": threads, "ari": r["ari"], "seconds": r["seconds"], "results": r["results"]}


def summary(runs: list[dict]) -> tuple[list[str], dict]:
    """(bucket names, {method: {bucket: (mean, min)}}) of exact-match accuracy over the runs."""
    buckets = list(next(iter(runs[0]["results"].values())))
    table = {}
    for method in runs[0]["results"]:
        table[method] = {}
        for b in buckets:
            vals = [r["results"][method][b]["accuracy"] for r in runs]
            table[method][b] = (sum(vals) / len(vals), min(vals))
    return buckets, table


def markdown(runs: list[dict], machine: dict) -> str:
    buckets, table = summary(runs)
    sparsest = buckets[0]
    lines = [f"# `proper demo` over seeds {sorted({r['seed'] for r in runs})} and torch threads "
             f"{sorted({r['threads'] for r in runs})}", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['isa']}; {machine['date']}; "
             + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v and k != "cuda_extension"), "",
             f"Regenerate: `python -m benchmarks.demo_seeds{' --avx2' if '--avx2' in machine['isa'] else ''}` "
             "(exact-match accuracy on the test split).", "",
             "## Every run", "",
             f"| seed | threads | ARI | stage 3 all | stage 3 {sparsest} | best other all | best other {sparsest} | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        res = r["results"]
        others = [m for m in res if m != "PROPER stage 3"]
        best = max(res[m]["all"]["accuracy"] for m in others)
        best_sparse = max(res[m][sparsest]["accuracy"] for m in others)
        lines.append(f"| {r['seed']} | {r['threads']} | {r['ari']:.3f} | {res['PROPER stage 3']['all']['accuracy']:.3f} "
                     f"| {res['PROPER stage 3'][sparsest]['accuracy']:.3f} | {best:.3f} | {best_sparse:.3f} "
                     f"| {r['seconds']:.0f} |")
    lines += ["", f"## Mean (minimum) over the {len(runs)} runs", "",
              "| method | " + " | ".join(f"{b} train records" if b != "all" else "all" for b in buckets) + " |",
              "|" + "---|" * (len(buckets) + 1)]
    for method, cells in table.items():
        lines.append(f"| {method} | " + " | ".join(f"{m:.3f} ({lo:.3f})" for m, lo in cells.values()) + " |")
    aris = [r["ari"] for r in runs]
    secs = [r["seconds"] for r in runs]
    lines += ["", f"ARI of stage 2's groups vs the true groups: mean {sum(aris) / len(aris):.3f}, "
                  f"minimum {min(aris):.3f}.",
              f"Wall time of one `proper demo`: {min(secs):.0f}-{max(secs):.0f} s; mean "
              + ", ".join(f"{sum(r['seconds'] for r in runs if r['threads'] == t) / sum(r['threads'] == t for r in runs):.0f}"
                          f" s with {t} thread{'s' if t > 1 else ''}" for t in sorted({r['threads'] for r in runs}))
              + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--avx2", action="store_true", help="use the AVX2 kernels of torch and MKL (module docstring)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--render", metavar="JSON", help="only rewrite the markdown of an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        text = markdown(saved["runs"], saved["machine"])
        Path(args.render).with_suffix(".md").write_text(text)
        print(text)
        return 0
    if any(t < 1 for t in args.threads):
        ap.error(f"--threads must be positive, got {args.threads}")
    date = dt.date.today().isoformat()
    machine = {"cpu": device_name(torch.device("cpu")).rsplit(" (", 1)[0], "cores": os.cpu_count(), "isa": cpu_isa() + (", run with AVX2 kernels (--avx2)" if args.avx2 else ""),
               "platform": platform.platform(), "date": date, "versions": versions()}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for threads in args.threads:
                runs.append(run_one(seed, threads, Path(tmp), args.avx2))
                r = runs[-1]
                print(f"seed {seed}, {threads} thread(s): ARI {r['ari']:.3f}, stage 3 "
                      f"{r['results']['PROPER stage 3']['all']['accuracy']:.3f}, {r['seconds']:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"demo-seeds-avx2-{date}" if args.avx2 else f"demo-seeds-{date}")
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "runs": runs}, indent=1) + "\n")
    text = markdown(runs, machine)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
