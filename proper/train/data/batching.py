"""Tokenising and batching for causal LMs: training batches with ``user_rows``, left-padded
prompts for generation, the chat template, and a collator for transformers' Trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .records import Example
from .users import UserIndex


@dataclass(frozen=True)
class Encoded:
    """One tokenised record: ``prompt`` ([bos] + input tokens) and ``target`` (output tokens
    + [eos]) ids, after truncation, and the user's bank row."""

    prompt: tuple[int, ...]
    target: tuple[int, ...]
    user_row: int


def special_token_ids(tokenizer) -> tuple[Optional[int], Optional[int], int]:
    """(bos, eos, pad) ids used for batches: bos = ``bos_token_id``; eos = ``eos_token_id``,
    else ``sep_token_id`` (BERT-style tokenizers); pad = ``pad_token_id``, else eos. The
    tokenizer is not modified. ValueError when there is neither a pad nor an eos token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "sep_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
    return bos, eos, pad


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _chat_encode(examples: Sequence[Example], tokenizer, rows: list[int], max_length: int,
                 with_target: bool) -> list[Encoded]:
    """encode() through the tokenizer's chat template: the prompt is the user turn with the
    assistant's generation prompt, the target the assistant turn as the template ends it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat-template: the tokenizer has no chat template (tokenizer.chat_template is unset)")
    _, eos, _ = special_token_ids(tokenizer)
    out = []
    for ex, row in zip(examples, rows):
        user = [{"role": "user", "content": ex.input}]
        prompt = list(_ids(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True)))
        target: list[int] = []
        if with_target:
            full = list(_ids(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": ex.output}],
                                                          tokenize=True)))
            if full[:len(prompt)] == prompt and len(full) > len(prompt):
                target = full[len(prompt):]
            else:  # a template whose assistant turn does not extend the prompt: the output, then eos
                target = _tokenize(tokenizer, [ex.output])[0] + ([eos] if eos is not None else [])
        target = target[: max_length - 1]
        budget = max_length - len(target)
        prompt = prompt[len(prompt) - budget:] if len(prompt) > budget else prompt  # its end (the turn) kept
        out.append(Encoded(tuple(prompt), tuple(target), int(row)))
    return out


def _ids(encoded) -> list[int]:
    """apply_chat_template's token ids, whether it returned a list or a BatchEncoding."""
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded


def encode(examples: Sequence[Example], tokenizer, user_index: Optional[UserIndex], max_length: int, *,
           add_bos: bool = True, add_eos: bool = True, with_target: bool = True,
           output_prefix: str = " ", chat_template: bool = False) -> list[Encoded]:
    """Tokenise records for a causal LM (no padding; see :func:`pad_encoded`).

    The prompt is ``[bos] + tokens(input)`` (bos when the tokenizer has one and ``add_bos``),
    the target ``tokens(output_prefix + output) + [eos]`` (eos when there is one and
    ``add_eos``). The leading space lets BPE tokenizers use their word-initial tokens.
    Longer than ``max_length``: the target is cut on the right to ``max_length - len(bos) - 1``
    tokens, then the input is cut on the left (its end, next to the answer, is kept; so is bos)
    to fit. With ``with_target=False`` the target is empty (prompts for generation).
    ``chat_template=True`` formats each record with the tokenizer's chat template instead:
    the input as the user's turn (with the assistant's generation prompt), the output as
    the assistant's turn (the loss is on that turn, as the template ends it).
    """
    if chat_template:
        examples = list(examples)
        rows = (user_index.rows([ex.user_id for ex in examples]).tolist() if user_index is not None
                else [-1] * len(examples))
        return _chat_encode(examples, tokenizer, rows, max_length, with_target)
    bos, eos, _ = special_token_ids(tokenizer)
    prefix = [bos] if add_bos and bos is not None else []
    least = len(prefix) + (2 if with_target else 1)
    if max_length < least:
        raise ValueError(f"max_length must be at least {least}, got {max_length}")
    examples = list(examples)
    inputs = _tokenize(tokenizer, [ex.input for ex in examples])
    outputs = _tokenize(tokenizer, [output_prefix + ex.output for ex in examples]) if with_target else [[] for _ in examples]
    rows = (user_index.rows([ex.user_id for ex in examples]).tolist() if user_index is not None
            else [-1] * len(examples))
    out = []
    for ex_i, (ids_in, ids_out, row) in enumerate(zip(inputs, outputs, rows)):
        target = ids_out + ([eos] if with_target and add_eos and eos is not None else [])
        target = target[: max_length - len(prefix) - 1]
        budget = max_length - len(prefix) - len(target)
        body = ids_in[len(ids_in) - budget:] if len(ids_in) > budget else ids_in
        if not prefix and not body:
            raise ValueError(f"record {ex_i} (line {examples[ex_i].line}): the input tokenises to nothing "
                             "and there is no bos token to start the sequence")
        out.append(Encoded(tuple(prefix + body), tuple(target), int(row)))
    return out


def pad_encoded(encoded: Sequence[Encoded], pad_id: int, *, padding_side: str = "right") -> dict[str, Tensor]:
    """Stack encoded records into a batch: ``input_ids`` (prompt + target, padded with
    ``pad_id``), ``attention_mask`` (1 on real tokens), ``labels`` (the target token ids,
    -100 on the prompt and padding; HF causal LMs shift them inside) and ``user_rows``."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not encoded:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e.prompt) + len(e.target) for e in encoded)
    n = len(encoded)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, e in enumerate(encoded):
        seq = e.prompt + e.target
        start = 0 if padding_side == "right" else width - len(seq)
        input_ids[i, start:start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, start:start + len(seq)] = 1
        if e.target:
            t0 = start + len(e.prompt)
            labels[i, t0:t0 + len(e.target)] = torch.tensor(e.target, dtype=torch.long)
    rows = torch.tensor([e.user_row for e in encoded], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "user_rows": rows}


def collate(examples: Sequence[Example], tokenizer, user_index: Optional[UserIndex], max_length: int, *,
            add_bos: bool = True, add_eos: bool = True, output_prefix: str = " ") -> dict[str, Tensor]:
    """A right-padded training batch: ``input_ids``, ``attention_mask``, ``labels`` (loss on
    the output and eos only) and ``user_rows`` (-1 for users without a row, or for every
    sequence when ``user_index`` is None). Works with any HF tokenizer that has a pad or an
    eos token (see :func:`special_token_ids`; the tokenizer is not modified)."""
    _, _, pad = special_token_ids(tokenizer)
    enc = encode(examples, tokenizer, user_index, max_length, add_bos=add_bos, add_eos=add_eos,
                 output_prefix=output_prefix)
    return pad_encoded(enc, pad, padding_side="right")


def collate_prompts(examples: Sequence[Example], tokenizer, user_index: Optional[UserIndex], max_length: int, *,
                    add_bos: bool = True, chat_template: bool = False) -> dict[str, Tensor]:
    """A left-padded batch of prompts for ``generate``: ``input_ids``, ``attention_mask``,
    ``user_rows`` (no labels). The prompts are the ones :func:`collate` trains on, so the
    generated tokens follow them as the outputs did; ``max_length`` bounds the prompt
    (input cut on the left, bos kept)."""
    _, _, pad = special_token_ids(tokenizer)
    enc = encode(examples, tokenizer, user_index, max_length, add_bos=add_bos, with_target=False,
                 chat_template=chat_template)
    batch = pad_encoded(enc, pad, padding_side="left")
    del batch["labels"]
    return batch


class TrainerCollator:
    """A ``data_collator`` for transformers' ``Trainer`` (and TRL's trainers) over proper's
    records: a list of :class:`Example` (``load_jsonl``'s records) becomes the batch of
    :func:`collate` with the bank rows under ``user_ids``, the argument a patched model's
    forward takes. Examples pass Trainer's ``remove_unused_columns`` untouched (it only
    filters dict rows), so the default settings work::

        Trainer(model=patched, args=args, train_dataset=load_jsonl(path),
                data_collator=TrainerCollator(tokenizer, UserIndex.from_examples(data), 256))
    """

    def __init__(self, tokenizer, user_index: Optional[UserIndex], max_length: int, **encode_kwargs) -> None:
        self.tokenizer, self.user_index, self.max_length = tokenizer, user_index, max_length
        self.encode_kwargs = encode_kwargs

    def __call__(self, records: Sequence[Example]) -> dict[str, Tensor]:
        bad = next((r for r in records if not isinstance(r, Example)), None)
        if bad is not None:
            raise TypeError(f"TrainerCollator batches proper.train.data.Example records (load_jsonl's), got "
                            f"{type(bad).__name__}")
        batch = collate(records, self.tokenizer, self.user_index, self.max_length, **self.encode_kwargs)
        batch["user_ids"] = batch.pop("user_rows")
        return batch
