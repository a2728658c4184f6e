"""``proper bench``: the suite's run (every level, one result file) and its command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import model as _model
from .op_run import run_op
from .plots import plots
from .schema import DTYPES, finish_rows, header, slug, write
from .timing import CUDA_BUDGET_MS, measure_peaks, timer_description

LEVELS = ("op", "block", "model", "train", "generate")


def default_rounds(device: torch.device, quick: bool) -> int:
    """Timed rounds on the CPU (on CUDA: the fewest runs, do_bench sizes the rest by time)."""
    return (7 if quick else 25) if device.type == "cpu" else 20


def resolve_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device is available (use --device cpu)")
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def settings(dev: torch.device, quick: bool, rounds: int, dtype_name: str, compile_ok: bool,
             compile_note: Optional[str], levels: Sequence[str], budget_ms: Optional[float] = None) -> dict:
    """The header's settings, the same keys for every command that writes the schema."""
    from .op import BYTES_MODEL

    return {"quick": quick, "rounds": rounds, "budget_ms": (budget_ms or CUDA_BUDGET_MS) if dev.type == "cuda" else None,
            "dtype": dtype_name, "compile": compile_ok, "compile_note": compile_note, "levels": list(levels),
            "timer": timer_description(dev),
            "threads": torch.get_num_threads(), "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "backward_timing": "torch.autograd.backward(y, dy, retain_graph=True) on prebuilt graphs "
                               "(backward_method says full_minus_forward where that failed)",
            "peak_memory": "torch.cuda.max_memory_allocated over memory_allocated before one call (null on cpu)",
            "bytes_model": BYTES_MODEL}


def measure_auto_table(dev: torch.device, quick: bool, log: Callable[[str], None] = print) -> list:
    """Time each backend per phase and write the auto table the dispatcher reads for this GPU
    (proper_kernels.auto_table)."""
    from proper_kernels import auto_table

    rows = auto_table.measure(dev, quick=quick)
    target = auto_table.write_measured(torch.cuda.get_device_name(dev), rows)
    for r in rows:
        log(f"auto table: {r.phase}: {r.backend} ({r.reason})")
    log(f"auto table written to {target}")
    return rows


def _compile_works(device: torch.device, log) -> tuple[bool, Optional[str]]:
    """Whether torch.compile works here (a C++ compiler on the CPU, Triton on a GPU): the
    proper-compile rows are left out, with the reason in the settings, when it does not."""
    try:
        f = torch.compile(lambda a: torch.relu(a) * 2.0, dynamic=False)
        f(torch.randn(8, device=device))
        return True, None
    except Exception as e:  # noqa: BLE001 - any toolchain failure means: no compile rows
        note = f"torch.compile unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        log(note)
        return False, note


def _summary(rows: list[dict], summary: dict) -> dict:
    by = {(r["sweep"], r["variant"]): r["median_ms"] for r in rows if r["level"] == "model"}
    if ("train", "proper") in by:
        summary["train_step_ms"] = {v: by[("train", v)] for v in ("lora", "proper", "peft-moe")}
        summary["train_proper_over_lora"] = by[("train", "proper")] / by[("train", "lora")]
        summary["train_peft_moe_over_proper"] = by[("train", "peft-moe")] / by[("train", "proper")]
    gen = {r["variant"]: r["tokens_per_s"] for r in rows if r["level"] == "model" and r["sweep"] == "generate"}
    if gen:
        summary["generate_tokens_per_s"] = gen
        summary["generate_proper_over_peft_mixed"] = gen["proper"] / gen["peft-mixed"]
    return summary


def run(device: str = "cpu", quick: bool = False, out: Optional[Path] = None, repeats: Optional[int] = None,
        compile: bool = True, log: Callable[[str], None] = print, levels: Sequence[str] = LEVELS,
        command: Optional[str] = None) -> dict:
    """Run the suite; returns the result dict (also written as JSON, markdown and PNGs)."""
    dev = resolve_device(device)
    dtype_name = "bf16" if dev.type == "cuda" else "fp32"
    dtype = DTYPES[dtype_name]
    rounds = repeats or default_rounds(dev, quick)
    compile_ok, compile_note = (_compile_works(dev, log) if compile else (False, "--no-compile"))
    t0 = time.time()
    result = header(dev, settings(dev, quick, rounds, dtype_name, compile_ok, compile_note, levels),
                    measure_peaks(dev, dtype, quick), command or "proper bench", [])
    log(f"proper bench on {result['device']['name']}, {dtype_name}, {'quick' if quick else 'full'}, {rounds} rounds")
    if dev.type == "cuda":  # first, so that the "proper" rows below run on the measured choice
        result["auto_table"] = [vars(r) for r in measure_auto_table(dev, quick, log)]
    rows, summary = [], {}
    if "op" in levels:
        rows += run_op(dev, dtype, dtype_name, quick, rounds, compile_ok, log)
    if "block" in levels:
        rows += _model.run_block(dev, dtype, dtype_name, quick, rounds, log)
    if "model" in levels:
        model_rows, summary = _model.run_model(dev, dtype, dtype_name, quick, rounds, compile_ok, log)
        rows += model_rows
    if "train" in levels:
        rows += _model.run_train(dev, dtype, dtype_name, quick, rounds, log)
    if "generate" in levels:
        rows += _model.run_generate(dev, dtype, dtype_name, quick, rounds, log)
    result["rows"] = finish_rows(rows, result["peaks"])
    result["summary"] = _summary(rows, summary) if summary else {}
    result["seconds"] = time.time() - t0
    out_dir = Path(out) if out is not None else Path("benchmarks") / "results"
    stem = out_dir / f"{slug(dev.type if dev.type == 'cpu' else result['device']['name'])}-{result['date']}"
    files = write(result, stem.with_suffix(".json"))
    result["files"] = [str(p) for p in files] + [str(p) for p in plots(result, stem)]
    log(f"wrote {', '.join(result['files'])} in {result['seconds']:.0f} s")
    return result


def _levels(text: str) -> tuple:
    levels = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in levels if s not in LEVELS]
    if bad or not levels:
        raise argparse.ArgumentTypeError(f"levels are a comma list of {', '.join(LEVELS)} (got {text!r})")
    return levels


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import __doc__ as doc

    if argv is not None and "--plan" in argv:  # the launch plan with its cost: no GPU, no timing
        from proper_kernels.cost import main as plan_main

        try:
            return plan_main(list(argv))
        except SystemExit as e:
            return int(e.code or 0)
    p = argparse.ArgumentParser(prog="proper bench", description=doc.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer, smaller cases and rounds")
    p.add_argument("--out", type=Path, default=None, help="output directory (default benchmarks/results)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per case")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--levels", type=_levels, default=LEVELS,
                   help=f"comma list of the levels to run (default: all of {','.join(LEVELS)})")
    p.add_argument("--plan", action="store_true",
                   help="print the Triton launch plan of the goal cases with bytes, FLOPs and predicted H100 "
                        "time (proper bench --plan --help), instead of timing")
    p.add_argument("--table", action="store_true",
                   help="only measure the backend table that backend='auto' reads on this GPU, and write it")
    args = p.parse_args(argv)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    try:
        if args.table:
            if args.device != "cuda" or not torch.cuda.is_available():
                raise RuntimeError("--table measures the GPU backends: it needs --device cuda and a CUDA device")
            measure_auto_table(torch.device("cuda", torch.cuda.current_device()), args.quick)
            return 0
        result = run(args.device, args.quick, args.out, args.repeats, compile=not args.no_compile,
                     levels=args.levels, command=" ".join(["proper bench", *argv_list]))
    except RuntimeError as e:
        print(f"proper bench: {e}", file=sys.stderr)
        return 2
    return 0 if all(r["ok"] for r in result["rows"]) else 1
