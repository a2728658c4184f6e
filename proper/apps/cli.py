"""The `proper` command line.

    proper demo [--out DIR] [--users N] [--seed S]       the whole method on the built-in task
    proper train --model PATH --data FILE --out DIR [--stages 1,2,3]
    proper eval --model PATH --data FILE --out DIR [--stage 3] [--predictions FILE]
    proper generate --model PATH --out DIR --user ID --prompt TEXT [--stage 3]
    proper export --model PATH --out DIR --user ID --format peft --dest DIR [--stage N]
    proper data lamp --task LaMP-N --questions Q.json [--outputs O.json] --out DIR
    proper bench [--device cpu|cuda] [--quick] [--out DIR]   speed and memory against peft

`--model` is a Hugging Face causal LM directory (loaded offline with its tokenizer); `--out`
holds the stages (stage1/, stage2/, stage3/), the user index (users.json) and the split.
Re-running `train` resumes: finished stages are skipped, an interrupted one continues from
its last checkpoint. `--user -1` (generate) is a user without a row: the cold-start path.

A refused command prints one line on stderr, `proper: error: ...`, and exits with status 2;
every flag is checked before the model or the data load. `--debug` (anywhere on the line)
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import commands
from .commands import CliError


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the one-line form of every other refusal."""

    def error(self, message: str):
        print(f"proper: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _one_line(e: BaseException) -> str:
    if isinstance(e, CliError):
        text = str(e)
    elif isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    elif isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
        if not isinstance(e, (ValueError, TypeError, RuntimeError, OSError)):
            text = f"{type(e).__name__}: {text} (an unexpected error: run again with --debug for the traceback)"
    return " ".join(text.split())


def _positive(name: str, value, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise CliError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")


def _stages(text: str) -> list[int]:
    from ..train.stages import STAGES

    try:
        stages = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        stages = []
    if not stages or any(s not in STAGES for s in stages):
        raise CliError(f"--stages must be a comma-separated list of {', '.join(map(str, STAGES))}, got {text!r}")
    return stages


def _validate(args) -> None:
    """Every flag, before anything heavy loads."""
    from ..train.stages import STAGES

    if getattr(args, "model", None) is not None and not Path(args.model).is_dir():
        raise CliError(f"--model: no model directory at {args.model}")
    if getattr(args, "data", None) is not None and not Path(args.data).is_file():
        raise CliError(f"--data: no file at {args.data}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out: {out} is a file, not a run directory")
    for name in ("max_length", "max_new_tokens", "save_every", "batch_size", "experts", "rank", "users",
                 "population_rank", "alpha", "user_alpha", "population_alpha"):
        if getattr(args, name, None) is not None:
            _positive("--" + name.replace("_", "-"), getattr(args, name))
    for name in ("user_rank", "load_balance", "distinctness", "seed", "log_every"):
        if getattr(args, name, None) is not None:
            _positive("--" + name.replace("_", "-"), getattr(args, name), allow_zero=True)
    if getattr(args, "lr", None) is not None:
        _positive("--lr", args.lr)
    if args.command == "train":
        args.stage_list = _stages(args.stages)
        args.steps_per_stage = _steps(args.steps)
        if not 1 <= args.top_k <= args.experts:
            raise CliError(f"--top-k must be in [1, --experts] = [1, {args.experts}], got {args.top_k}")
    stage = getattr(args, "stage", None)
    if stage is not None and stage not in STAGES:
        raise CliError(f"--stage must be one of {', '.join(map(str, STAGES))}, got {stage}")
    predictions = getattr(args, "predictions", None)
    if predictions is not None and (Path(predictions).is_dir() or not Path(predictions).parent.is_dir()):
        raise CliError(f"--predictions: cannot write a file at {predictions}")
    if args.command == "data":
        from ..train.lamp import task_of

        try:
            task_of(args.task)
        except ValueError as e:
            raise CliError(str(e)) from None
        for flag, path in (("--questions", args.questions), ("--outputs", args.outputs)):
            if path is not None and not Path(path).is_file():
                raise CliError(f"{flag}: no file at {path}")
    if args.command in ("generate", "export") and not (out / "users.json").is_file():
        raise CliError(f"--out: {out} is not a trained run (no users.json); run `proper train` first")


def _defaults() -> tuple[dict, dict]:
    """The field defaults of PipelineConfig and TrainConfig (the CLI states none of its own)."""
    import dataclasses

    from ..train.stages import PipelineConfig
    from ..train.trainer import TrainConfig

    def of(cls):
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}

    return of(PipelineConfig), of(TrainConfig)


def _steps(text: str) -> dict[int, int]:
    """--steps: one count for every stage, or one per stage."""
    from ..train.stages import STAGES

    try:
        counts = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise CliError(f"--steps must be a positive integer or one per stage ({len(STAGES)}), got {text!r}") from None
    if len(counts) == 1:
        counts = counts * len(STAGES)
    if len(counts) != len(STAGES) or any(c <= 0 for c in counts):
        raise CliError(f"--steps must be a positive integer or {len(STAGES)} of them (one per stage), got {text!r}")
    return dict(zip(STAGES, counts))


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--model", required=True, help="a Hugging Face causal LM directory")
    if data:
        p.add_argument("--data", required=True, help='JSONL: {"user_id", "input", "output"} per line')
    p.add_argument("--out", required=True, help="the run directory (stages, user index)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--chat-template", action="store_true",
                   help="format input/output with the tokenizer's chat template (train, eval and generate alike)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PROPER_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] == ["bench"]:  # its own parser: `proper bench --help` lists the bench options
        from .bench import main as bench_main

        return bench_main(argv[1:])
    ap = _Parser(prog="proper", description="PROPER-style personalized LLMs",
                 epilog="--debug (anywhere on the line) shows a refused command's traceback")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="all three stages and the baselines on the built-in synthetic task")
    p.add_argument("--out", default="proper-demo")
    # None: DemoConfig's own default (200 users, seed 0), stated there once
    p.add_argument("--users", type=int, default=None, help="synthetic users (default: DemoConfig's, 200)")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=commands.cmd_demo)

    p = sub.add_parser("train", help="train stages 1-3 on your model and data")
    _common(p)
    # Defaults: the pipeline's and the trainer's own (PipelineConfig, TrainConfig), stated there once.
    pc, tc = _defaults()
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--target-modules", nargs="+", default=list(pc["target_modules"]))
    p.add_argument("--population-rank", type=int, default=pc["population_rank"], help="stage 1's LoRA rank")
    p.add_argument("--population-alpha", type=float, default=pc["population_alpha"])
    p.add_argument("--experts", type=int, default=pc["num_experts"])
    p.add_argument("--top-k", type=int, default=pc["top_k"])
    p.add_argument("--rank", type=int, default=pc["rank"], help="stage 2's expert rank")
    p.add_argument("--alpha", type=float, default=pc["alpha"], help="stage 2's LoRA alpha (scaling alpha / rank)")
    p.add_argument("--user-rank", type=int, default=pc["user_rank"], help="stage 3's per-user rank")
    p.add_argument("--user-alpha", type=float, default=pc["user_alpha"], help="stage 3's alpha (user_alpha / user_rank)")
    p.add_argument("--steps", default=str(tc["steps"]),
                   help="training steps: one number for every stage, or one per stage (e.g. 100,200,300)")
    p.add_argument("--lr", type=float, default=tc["lr"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--save-every", type=int, default=tc["save_every"])
    p.add_argument("--log-every", type=int, default=tc["log_every"],
                   help="a progress line every N steps when the output is not a terminal (0: none)")
    p.add_argument("--load-balance", type=float, default=tc["load_balance"], help="weight of stage 2's load-balance loss")
    p.add_argument("--distinctness", type=float, default=tc["distinctness"],
                   help="weight of stage 2's expert distinctness loss")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default=tc["parallel"],
                   help="several processes (torchrun, accelerate launch): DDP or FSDP2 over all but the user bank")
    p.add_argument("--mixed-precision", choices=("no", "bf16"), default=tc["mixed_precision"] or "no",
                   help="bf16 compute: FSDP's bf16 weights with fp32 gradient reduction, else autocast")
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser("eval", help="LaMP metrics of a stage on the test split, per history bucket")
    _common(p)
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--kind", choices=("classification", "rating", "generation"), default=None,
                   help="the metric family (default: the task's, for `proper data lamp` files; else generation)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--predictions", default=None,
                   help="also write one JSONL line per test record: user_id, input, reference, prediction")
    p.set_defaults(func=commands.cmd_eval)

    p = sub.add_parser("generate", help="generate for one user")
    _common(p, data=False)
    p.add_argument("--user", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=commands.cmd_generate)

    p = sub.add_parser("export", help="one user's adapter as a standard PEFT LoRA")
    _common(p, data=False)
    p.add_argument("--user", required=True)
    p.add_argument("--format", default="peft")
    p.add_argument("--dest", required=True)
    p.add_argument("--stage", type=int, default=None,
                   help="the stage to export (default: the latest one with an exact PEFT export)")
    p.set_defaults(func=commands.cmd_export)

    p = sub.add_parser("data", help="convert a benchmark's files into proper's JSONL")
    dsub = p.add_subparsers(dest="source", required=True)
    p = dsub.add_parser("lamp", help="LaMP: questions (+ gold outputs) -> one user per question")
    p.add_argument("--task", required=True, help="LaMP-1, -2, -3, -4, -5 or -7")
    p.add_argument("--questions", required=True, help='the questions file: [{"id", "input", "profile"}]')
    p.add_argument("--outputs", default=None, help='the gold outputs file: {"task", "golds": [{"id", "output"}]}')
    p.add_argument("--out", required=True, help="the directory to write <task>.jsonl into")
    p.set_defaults(func=commands.cmd_data)

    sub.add_parser("bench", help="speed and memory against peft (proper bench --help)")

    args = ap.parse_args(argv)
    try:
        _validate(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("proper: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every refusal is one line; --debug shows the traceback
        if debug:
            raise
        print(f"proper: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
