"""What each `proper` command does, once the command line (``proper.apps.cli``) has
parsed and checked its flags: train, eval, generate, export, data, demo. A refusal here is a
:class:`CliError` (or a package error), which the command line prints as one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

COLD_START = "-1"  # --user -1: a user without a row


class CliError(Exception):
    """A refused command: its message is printed as one line, without a traceback."""


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


