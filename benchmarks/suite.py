"""The whole test suite on a GPU machine, spread over its cores (a later lease's phase,
``bash benchmarks/run_gpu.sh --phase suite``): the test files are dealt into ``--workers``
shards of about equal size, each shard one pytest process, all at once. One row per shard
(its files, its counts and its last line); exit 1 if any test failed.

    python -m benchmarks.suite [--workers N] [--rows FILE] [-k EXPR]

The emulator's cases are deselected (``-k "not emu"``, they run in CI); the interpreter is
off, so the Triton tests compile for the device.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.rows import RowSink, summary

ROOT = Path(__file__).resolve().parents[1]
COUNTS = ("passed", "failed", "errors", "error", "skipped")


def shards(files: list[Path], n: int) -> list[list[Path]]:
    """The files dealt into n shards, largest first, each to the lightest shard so far."""
    out: list[list[Path]] = [[] for _ in range(max(1, min(n, len(files))))]
    load = [0] * len(out)
    for f in sorted(files, key=lambda f: -f.stat().st_size):
        i = load.index(min(load))
        out[i].append(f)
        load[i] += f.stat().st_size
    return [s for s in out if s]


def counts(last_line: str) -> dict:
    """pytest's closing counts ('3 passed, 1 failed in 2.0s') as a dict."""
    found = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", last_line)}
    found["errors"] = found.pop("error", 0) + found.get("errors", 0)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--rows", type=Path, default=None)
    p.add_argument("-k", dest="expr", default="not emu", help="pytest's -k expression (default: 'not emu')")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    sink = RowSink(args.rows, phase="suite")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    procs = []
    for i, files in enumerate(shards(sorted((ROOT / "tests").glob("test_*.py")), args.workers)):
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", args.expr,
               *[str(f.relative_to(ROOT)) for f in files]]
        procs.append((i, files, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True), time.time()))
    total = dict.fromkeys(("passed", "failed", "errors", "skipped"), 0)
    for i, files, proc, t0 in procs:
        out = proc.communicate()[0]
        print(out, flush=True)
        last = (out.strip().splitlines() or ["no output"])[-1]
        got = counts(last)
        for k in total:
            total[k] += got.get(k, 0)
        sink.write(dict(shard=i, files=[f.name for f in files], exit_status=proc.returncode, last_line=last,
                        seconds=round(time.time() - t0, 1), **got))
    summary(", ".join(f"{v} {k}" for k, v in total.items()) + f" in {len(procs)} shards")
    return 0 if all(proc.returncode in (0, 5) for _, _, proc, _ in procs) and not total["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
