"""Stage-3 training speed: every user's LoRA at once in mixed-user batches (proper) against
one PEFT LoRA per user, trained one user at a time, for the same number of steps per user.

    python -m benchmarks.bench_stage3 [--users 1000] [--steps-per-user 4] [--batch 256]
                                      [--peft-sample 50] [--out FILE.json]

CPU, the tiny Llama of `proper demo`. The PEFT loop is timed on the first `--peft-sample`
users and scaled to all users (its cost is the same for every user: one adapter, the same
number of steps); the JSON says so. Writes JSON and a markdown line next to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

import torch

from proper.apps.bench import device_name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--steps-per-user", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="proper runs; the median is reported")
    ap.add_argument("--peft-sample", type=int, default=50)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import peft
    import transformers

    import proper
    from proper.train.data import UserIndex, special_token_ids
    from proper.apps.demo import tiny_llama, word_tokenizer
    from proper.train.pipeline import batch_sampler, encode_split
    from proper.train.stages import PipelineConfig
    from proper.train.synthetic import make_task

    torch.manual_seed(0)
    task = make_task(num_users=args.users, seed=0)
    tok = word_tokenizer(task.vocabulary())
    users = UserIndex.from_examples(task.examples)
    enc = encode_split(task.examples, tok, users, 16)
    pad = special_token_ids(tok)[2]
    targets = ["gate_proj", "up_proj", "down_proj"]
    n_steps = args.users * args.steps_per_user // args.batch

    # proper: the stage-3 layer (4 group experts, top-2, the user-aware and LoRA-aware routers,
    # the user bank); the bank and W_h train, all users in mixed batches (user-balanced).
    cfg = PipelineConfig(num_users=len(users), target_modules=tuple(targets), num_experts=4, top_k=2, rank=8,
                         user_rank=args.rank, user_alpha=8.0).stage_config(3)
    batch_at = batch_sampler(enc, pad, args.batch, 0, "user")
    batches = [batch_at(s) for s in range(n_steps)]

    def proper_run() -> float:
        model = proper.patch_model(tiny_llama(len(tok), 64, 2, seed=0), cfg)
        params = [p for n, p in model.named_parameters()
                  if p.requires_grad and n.endswith(("user_A", "user_B", "router_h"))]
        opt = torch.optim.AdamW(params, lr=1e-2)
        model.train()
        t0 = time.perf_counter()
        for b in batches:
            b = dict(b)
            with proper.user_context(model, b.pop("user_rows")):
                loss = model(**b).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    proper_runs = sorted(proper_run() for _ in range(args.repeats))
    proper_s = proper_runs[len(proper_runs) // 2]

    # PEFT: one LoRA per user, trained alone on that user's records.
    base = tiny_llama(len(tok), 64, 2, seed=0)
    lcfg = peft.LoraConfig(r=args.rank, lora_alpha=8.0, target_modules=targets, lora_dropout=0.0)
    by_user: dict[int, list] = {}
    for e in enc:
        by_user.setdefault(e.user_row, []).append(e)
    sample = sorted(by_user)[: args.peft_sample]
    from proper.train.data import pad_encoded

    t0 = time.perf_counter()
    for row in sample:
        pm = peft.get_peft_model(base, lcfg)
        popt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        pm.train()
        records = by_user[row]
        for s in range(args.steps_per_user):
            b = pad_encoded([records[s % len(records)]], pad)
            b.pop("user_rows")
            loss = pm(**b).loss
            popt.zero_grad()
            loss.backward()
            popt.step()
        base = pm.unload()  # back to the plain base for the next user
    peft_sample_s = time.perf_counter() - t0
    peft_s = peft_sample_s * args.users / len(sample)

    result = {
        "schema": "proper.bench_stage3/1",
        "date": dt.date.today().isoformat(),
        "device": f"cpu: {device_name(torch.device('cpu'))}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
        "settings": vars(args),
        "proper_mixed_s": proper_s,
        "proper_runs_s": proper_runs,
        "proper_steps": n_steps,
        "peft_one_at_a_time_s": peft_s,
        "peft_measured_users": len(sample),
        "peft_measured_s": peft_sample_s,
        "peft_note": f"timed on {len(sample)} users, scaled by {args.users / len(sample):.0f}",
        "speedup": peft_s / proper_s,
    }
    line = (f"| stage-3 training, {args.users} users x {args.steps_per_user} steps | proper mixed batches "
            f"{proper_s:.1f} s | PEFT one LoRA at a time {peft_s:.1f} s (from {len(sample)} users) | "
            f"{result['speedup']:.1f}x |")
    print(line)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
