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
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

COLD_START = "-1"  # --user -1: a user without a row


class CliError(Exception):
    """A refused command: its message is printed as one line, without a traceback."""


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


def _user(users, text: str, allow_cold: bool):
    """The user id a --user argument names (-1: a user without a row, where allowed)."""
    try:
        return users.parse(text)
    except KeyError:
        if allow_cold and text == COLD_START:
            return -1  # no row in the index: the cold-start path
        raise CliError(f"--user: unknown user {text!r} (this run has {len(users)} users"
                       + ("; -1 is a user without a row)" if allow_cold else ")")) from None


def _check_chat_template(args, tokenizer) -> None:
    if getattr(args, "chat_template", False) and not getattr(tokenizer, "chat_template", None):
        raise CliError(f"--chat-template: the tokenizer of {args.model} has no chat template")


def _model_loader(path: str):
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)

    def build():
        model = AutoModelForCausalLM.from_pretrained(path)
        if torch.cuda.is_available():  # one GPU per process (torchrun sets LOCAL_RANK)
            model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        return model

    return build, tokenizer


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


def _pipeline_config(args, num_users: int):
    from ..train.stages import PipelineConfig
    from ..train.trainer import TrainConfig

    def train(steps):
        return TrainConfig(steps=steps, lr=args.lr, save_every=args.save_every, seed=args.seed, log_every=args.log_every,
                           load_balance=args.load_balance, distinctness=args.distinctness, parallel=args.parallel,
                           mixed_precision=None if args.mixed_precision == "no" else args.mixed_precision)

    return PipelineConfig(num_users=num_users, target_modules=tuple(args.target_modules),
                          population_rank=args.population_rank, population_alpha=args.population_alpha,
                          num_experts=args.experts, top_k=args.top_k, rank=args.rank, alpha=args.alpha,
                          user_rank=args.user_rank, user_alpha=args.user_alpha,
                          train={s: train(n) for s, n in args.steps_per_stage.items()})


def _data(args, out: Path):
    from ..train.data import UserIndex, load_jsonl, split_by_user

    data = load_jsonl(args.data)
    split = split_by_user(data, seed=args.seed)
    index_path = out / "users.json"
    users = UserIndex.load(index_path) if index_path.is_file() else UserIndex.from_examples(data)
    if not index_path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        users.save(index_path)
    return split, users


def cmd_demo(args) -> int:
    from .demo import DemoConfig, run

    given = {"num_users": args.users, "seed": args.seed}
    cfg = DemoConfig(**{k: v for k, v in given.items() if v is not None})
    run(Path(args.out), cfg)
    return 0


def _init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo otherwise."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def cmd_train(args) -> int:
    import torch

    from ..train.data import special_token_ids
    from ..train.distributed import world
    from ..train.pipeline import batch_sampler, encode_split
    from ..train.stages import run_stage

    _init_distributed()
    out = Path(args.out)
    build, tokenizer = _model_loader(args.model)
    _check_chat_template(args, tokenizer)
    split, users = _data(args, out)
    enc = encode_split(split.train, tokenizer, users, args.max_length, chat_template=args.chat_template)
    pad = special_token_ids(tokenizer)[2]
    cfg = _pipeline_config(args, len(users))
    for stage in args.stage_list:
        balance = "user" if stage == 3 else "record"  # stage 3: every user's own LoRA gets trained
        torch.manual_seed(args.seed * 1000 + stage)  # the adapters' initialisation: the same on every run and rank
        run_stage(build, batch_sampler(enc, pad, args.batch_size, args.seed * 101 + stage, balance), out, cfg, stage,
                  records=enc, pad_id=pad)
        if world()[0] == 0:
            print(f"stage {stage} done: {out / f'stage{stage}' / 'final'}")
    return 0


def cmd_eval(args) -> int:
    from .._fs import atomic_write_text
    from ..train.metrics import score, score_by_bucket
    from ..train.pipeline import generate
    from ..train.stages import load_stage

    out = Path(args.out)
    build, tokenizer = _model_loader(args.model)
    _check_chat_template(args, tokenizer)
    split, users = _data(args, out)
    kind = args.kind or _task_kind(split.test)
    model = load_stage(build, out, args.stage)
    test = list(split.test)
    preds = generate(model, test, tokenizer, users, args.max_length, args.max_new_tokens,
                     chat_template=args.chat_template)
    refs, uids = [ex.output for ex in test], [ex.user_id for ex in test]
    table = score_by_bucket(kind, preds, refs, uids, split.train.counts())
    per_user: dict[str, list[int]] = {}
    for i, u in enumerate(uids):
        per_user.setdefault(str(u), []).append(i)
    table["per_user"] = {u: {**score(kind, [preds[i] for i in idx], [refs[i] for i in idx]), "records": len(idx)}
                         for u, idx in per_user.items()}
    if args.predictions:
        lines = [json.dumps({"user_id": ex.user_id, "input": ex.input, "reference": ex.output, "prediction": p})
                 for ex, p in zip(test, preds)]
        atomic_write_text(args.predictions, "".join(line + "\n" for line in lines))
    print(json.dumps(table, indent=2))
    return 0


def _task_kind(test) -> str:
    """The metric kind of the test records' task (``proper data lamp`` marks them), else
    generation."""
    from ..train.lamp import kind_of

    tasks = {ex.extra.get("task") for ex in test}
    if len(tasks) == 1 and None not in tasks:
        return kind_of(tasks.pop())
    return "generation"


def cmd_data(args) -> int:
    from ..train.lamp import write

    print(write(args.task, args.questions, args.outputs, args.out))
    return 0


def cmd_generate(args) -> int:
    from ..train.data import Example, UserIndex
    from ..train.pipeline import generate
    from ..train.stages import load_stage

    out = Path(args.out)
    users = UserIndex.load(out / "users.json")
    uid = _user(users, args.user, allow_cold=True)
    build, tokenizer = _model_loader(args.model)
    _check_chat_template(args, tokenizer)
    model = load_stage(build, out, args.stage)
    text = generate(model, [Example(uid, args.prompt, "x")], tokenizer, users, args.max_length,
                    args.max_new_tokens, chat_template=args.chat_template)[0]
    print(json.dumps({"user": uid, "prompt": args.prompt, "output": text}))
    return 0


def _export_stage(out: Path, asked: Optional[int]) -> int:
    """The stage to export: `asked`, or the latest finished stage with an exact PEFT LoRA
    (said on stderr). Raises CliError, saying why and which stage to use, otherwise."""
    from ..export import inexact_reason
    from ..io import load_config
    from ..train.stages import STAGES, is_done, stage_dir

    # why each finished stage has no exact export (None: it has one), its config read once
    reasons = {s: inexact_reason(load_config(stage_dir(out, s) / "final")) for s in STAGES if is_done(out, s)}
    exact = [s for s, reason in reasons.items() if reason is None]
    if asked is not None:
        if asked not in STAGES:
            raise CliError(f"--stage must be one of {', '.join(map(str, STAGES))}, got {asked}")
        if asked not in reasons:
            raise CliError(f"stage {asked} is not trained in {out} (no {stage_dir(out, asked) / 'final'}); "
                           f"run `proper train` first")
        if reasons[asked] is not None:
            hint = f"export --stage {exact[-1]} instead" if exact else "no finished stage of this run exports exactly"
            raise CliError(f"stage {asked} has no exact PEFT export: {reasons[asked]}; {hint}")
        return asked
    if not exact:
        raise CliError(f"no finished stage in {out} has an exact PEFT export"
                       + ("" if reasons else " (no stage is trained yet: run `proper train` first)"))
    later = [s for s in reasons if s > exact[-1]]
    why = f" (stage {later[0]}: {reasons[later[0]]})" if later else ""
    print(f"proper: exporting stage {exact[-1]}, the latest stage with an exact PEFT export{why}",
          file=sys.stderr)
    return exact[-1]


def cmd_export(args) -> int:
    from ..train.data import UserIndex
    from ..export import export_peft
    from ..train.stages import load_stage

    if args.format != "peft":
        raise CliError(f"--format must be 'peft', got {args.format!r}")
    out = Path(args.out)
    users = UserIndex.load(out / "users.json")
    row = users.row(_user(users, args.user, allow_cold=False))
    stage = _export_stage(out, args.stage)
    build, _ = _model_loader(args.model)
    model = load_stage(build, out, stage)
    print(export_peft(model, row, args.dest))
    return 0


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
    p.set_defaults(func=cmd_demo)

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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="LaMP metrics of a stage on the test split, per history bucket")
    _common(p)
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--kind", choices=("classification", "rating", "generation"), default=None,
                   help="the metric family (default: the task's, for `proper data lamp` files; else generation)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--predictions", default=None,
                   help="also write one JSONL line per test record: user_id, input, reference, prediction")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate for one user")
    _common(p, data=False)
    p.add_argument("--user", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="one user's adapter as a standard PEFT LoRA")
    _common(p, data=False)
    p.add_argument("--user", required=True)
    p.add_argument("--format", default="peft")
    p.add_argument("--dest", required=True)
    p.add_argument("--stage", type=int, default=None,
                   help="the stage to export (default: the latest one with an exact PEFT export)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="convert a benchmark's files into proper's JSONL")
    dsub = p.add_subparsers(dest="source", required=True)
    p = dsub.add_parser("lamp", help="LaMP: questions (+ gold outputs) -> one user per question")
    p.add_argument("--task", required=True, help="LaMP-1, -2, -3, -4, -5 or -7")
    p.add_argument("--questions", required=True, help='the questions file: [{"id", "input", "profile"}]')
    p.add_argument("--outputs", default=None, help='the gold outputs file: {"task", "golds": [{"id", "output"}]}')
    p.add_argument("--out", required=True, help="the directory to write <task>.jsonl into")
    p.set_defaults(func=cmd_data)

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
