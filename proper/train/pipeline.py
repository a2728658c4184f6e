"""Glue between the data layer and the stages: batches, generation and evaluation.

Batches are drawn per step from a seeded generator (so the data order depends on the step
alone and training resumes exactly), either uniformly over records or balanced over users
(every user as likely as any other: the sparse users of a Pareto history get seen).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from .data import Dataset, Encoded, UserIndex, collate_prompts, encode, pad_encoded, special_token_ids
from .metrics import score_by_bucket
from ..patching import is_patched, user_context


def batch_sampler(encoded: Sequence[Encoded], pad_id: int, batch_size: int, seed: int,
                  balance: str = "record") -> Callable[[int], dict]:
    """batch_at(step) -> a right-padded training batch with "user_rows".

    balance="record": records uniformly; "user": a user uniformly, then one of their records."""
    if not encoded:
        raise ValueError("no training records")
    if balance not in ("record", "user"):
        raise ValueError(f"balance must be 'record' or 'user', got {balance!r}")
    by_user: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        by_user.setdefault(e.user_row, []).append(i)
    users = sorted(by_user)

    def batch_at(step: int) -> dict:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        if balance == "record":
            picks = torch.randint(0, len(encoded), (batch_size,), generator=g).tolist()
        else:
            us = torch.randint(0, len(users), (batch_size,), generator=g).tolist()
            picks = [by_user[users[u]][int(torch.randint(0, len(by_user[users[u]]), (1,), generator=g))] for u in us]
        return pad_encoded([encoded[i] for i in picks], pad_id)

    return batch_at


@torch.no_grad()
def generate(model: nn.Module, examples: Sequence, tokenizer, user_index: Optional[UserIndex], max_length: int,
             max_new_tokens: int, batch_size: int = 64, chat_template: bool = False) -> list[str]:
    """Greedy generation for many users in one batch (each sequence with its own user)."""
    _, eos, pad = special_token_ids(tokenizer)
    model.eval()
    outputs: list[str] = []
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i : i + batch_size])
        batch = collate_prompts(chunk, tokenizer, user_index, max_length, chat_template=chat_template)
        users = batch.pop("user_rows")
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos)
        if is_patched(model):
            with user_context(model, users):
                out = model.generate(**batch, **kwargs)
        else:
            out = model.generate(**batch, **kwargs)
        new = out[:, batch["input_ids"].shape[1]:]
        outputs += [s.strip() for s in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return outputs


def evaluate(model: nn.Module, test: Dataset, train: Dataset, tokenizer, user_index: Optional[UserIndex],
             max_length: int, max_new_tokens: int, kind: str = "classification",
             edges: Sequence[int] = (1, 5, 20), **score_kw) -> dict[str, dict]:
    """The metrics of `kind` on `test`, per history-size bucket of the training split."""
    preds = generate(model, test, tokenizer, user_index, max_length, max_new_tokens)
    counts = train.counts()
    return score_by_bucket(kind, preds, [ex.output for ex in test], [ex.user_id for ex in test], counts, edges,
                           **score_kw)


def encode_split(examples: Dataset, tokenizer, user_index: UserIndex, max_length: int,
                 chat_template: bool = False) -> list[Encoded]:
    return encode(list(examples), tokenizer, user_index, max_length, chat_template=chat_template)
