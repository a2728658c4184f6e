"""Multi-user data: LaMP-shaped JSONL records, user-id -> bank-row mapping, per-user
splits and batching for the trainer.

A data file holds one JSON object per line::

    {"user_id": "u17", "input": "opinion on books ?", "output": "like indeed", "timestamp": 3}

``user_id`` is a JSON integer or a non-empty string, ``input`` and ``output`` non-empty
strings; every other key is kept, unchanged, in the record's ``extra`` dict. Blank lines
are skipped. A malformed line raises :class:`DataError` naming the file, the 1-based line
number and what is wrong; the file is parsed whole before anything is built, so a failing
load returns and caches nothing.

User ids keep their JSON type: ``"1"`` and ``1`` are two different users (a file produced
by a tool that writes ids as strings stays consistent with itself; silently merging them
could mix two people's data). :class:`UserIndex` maps ids to the rows of the user bank.

Splits (:func:`split_by_user`) are per user: when every record carries a timestamp, each
user's history is ordered by time and the latest records go to test, the ones before them
to validation, so no future record is trained on; otherwise each user's records are
shuffled with a seed. Rules for short histories (n = the user's number of records)::

    n = 1   -> train 1
    n = 2   -> train 1, test 1
    n = 3   -> train 2, test 1
    n >= 4  -> test  = max(1, round(test * n)),
               val   = max(1, round(val * n)) but only while train keeps >= 2 records,
               train = the rest (always >= 1)

so every user with two or more records is evaluated (the sparse users the method is for),
and a user with a single record only trains. Fractions of 0 turn a part off.

Batches (:func:`collate`) are built for causal language models: ``[bos] prompt output
[eos]``, labels equal to the input ids on the output (and eos) tokens and -100 on the
prompt and padding, plus ``user_rows`` (one bank row per sequence, -1 for a user without
a row). Prompt and output are tokenised separately (no special tokens added by the
tokenizer), so generation from :func:`collate_prompts`' left-padded prompts sees exactly
the token sequence training saw.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .._fs import atomic_write, atomic_write_text

UserId = Union[int, str]
REQUIRED = ("user_id", "input", "output")
TIME_KEY = "timestamp"
SPLIT_KEY, SPLIT_PARTS = "split", ("train", "val", "test")  # a record's own part of the split
INDEX_FORMAT = "proper-user-index"
INDEX_VERSION = 1

__all__ = [
    "DataError",
    "Dataset",
    "Encoded",
    "Example",
    "Split",
    "UserIndex",
    "collate",
    "collate_prompts",
    "encode",
    "load_jsonl",
    "pad_encoded",
    "parse_timestamp",
    "special_token_ids",
    "split_by_user",
    "write_jsonl",
]


class DataError(ValueError):
    """A data file or record is malformed. ``path`` and ``line`` (1-based) say where, when
    known; ``reason`` says what is wrong."""

    def __init__(self, reason: str, path: Optional[Union[str, os.PathLike]] = None, line: Optional[int] = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        self.line = line
        where = self.path or "<data>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {reason}")


@dataclass
class Example:
    """One record. ``extra`` holds every key of the JSON object besides the three required
    ones; ``line`` is the 1-based line of the source file (None when not read from a file)."""

    user_id: UserId
    input: str
    output: str
    extra: dict = field(default_factory=dict)
    line: Optional[int] = None

    def to_json(self) -> dict:
        """The JSON object of this record (required keys first, then ``extra``)."""
        clash = [k for k in REQUIRED if k in self.extra]
        if clash:
            raise DataError(f"extra repeats the required key {clash[0]!r}", line=self.line)
        return {"user_id": self.user_id, "input": self.input, "output": self.output, **self.extra}


# --------------------------------------------------------------------------- validation


def _check_user_id(uid: Any) -> Optional[str]:
    """None when ``uid`` is a valid user id, else what is wrong with it."""
    if isinstance(uid, bool) or not isinstance(uid, (int, str)):
        return f"'user_id' must be an integer or a string, got {_json_type(uid)}"
    if isinstance(uid, str) and not uid.strip():
        return "'user_id' is empty"
    return None


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"a number ({v!r})"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def parse_timestamp(value: Any) -> float:
    """A sortable time: a finite JSON number as is, or an ISO-8601 date/datetime string as
    POSIX seconds (a time without a zone is taken as UTC). Raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number or an ISO-8601 date string, got {_json_type(value)}")
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {value!r}")
        return v
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"is not an ISO-8601 date: {value!r}") from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        return t.timestamp()
    raise ValueError(f"must be a number or an ISO-8601 date string, got {_json_type(value)}")


def _time_kind(value: Any) -> str:
    return "string" if isinstance(value, str) else "number"


class _LineError(Exception):
    pass


def _reject_constant(name: str):
    raise _LineError(f"{name} is not valid JSON (non-finite numbers are not allowed)")


def _parse_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise _LineError(f"number {text} is out of range")
    return v


def _no_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise _LineError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def _record_from_obj(obj: Any, time_key: Optional[str]) -> tuple[UserId, str, str, dict]:
    if not isinstance(obj, dict):
        raise _LineError(f"expected a JSON object, got {_json_type(obj)}")
    for key in REQUIRED:
        if key not in obj:
            raise _LineError(f"missing required key {key!r}")
    uid = obj["user_id"]
    problem = _check_user_id(uid)
    if problem:
        raise _LineError(problem)
    for key in ("input", "output"):
        v = obj[key]
        if not isinstance(v, str):
            raise _LineError(f"{key!r} must be a string, got {_json_type(v)}")
        if not v.strip():
            raise _LineError(f"{key!r} is empty")
    extra = {k: v for k, v in obj.items() if k not in REQUIRED}
    if time_key is not None and time_key in extra:
        try:
            parse_timestamp(extra[time_key])
        except ValueError as e:
            raise _LineError(f"{time_key!r} {e}") from None
    return uid, obj["input"], obj["output"], extra


# --------------------------------------------------------------------------- Dataset


class Dataset(Sequence[Example]):
    """An immutable sequence of :class:`Example` (slicing gives a Dataset). ``source`` is the
    file it was read from, if any."""

    def __init__(self, examples: Iterable[Example] = (), source: Optional[Union[str, os.PathLike]] = None):
        self._examples = tuple(examples)
        for i, ex in enumerate(self._examples):
            if not isinstance(ex, Example):
                raise TypeError(f"Dataset items must be Example, item {i} is {type(ex).__name__}")
        self.source = None if source is None else str(source)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Dataset(self._examples[i], self.source)
        return self._examples[i]

    def __iter__(self) -> Iterator[Example]:
        return iter(self._examples)

    def __eq__(self, other) -> bool:
        if isinstance(other, Dataset):
            return self._examples == other._examples
        return NotImplemented

    __hash__ = None  # mutable Examples inside

    def __repr__(self) -> str:
        src = f", source={self.source!r}" if self.source else ""
        return f"Dataset({len(self)} examples, {len(self.users())} users{src})"

    def users(self) -> list[UserId]:
        """Distinct user ids in order of first appearance."""
        return list(dict.fromkeys(ex.user_id for ex in self._examples))

    def by_user(self) -> dict[UserId, list[Example]]:
        """Each user's records, in dataset order (users in order of first appearance)."""
        out: dict[UserId, list[Example]] = {}
        for ex in self._examples:
            out.setdefault(ex.user_id, []).append(ex)
        return out

    def counts(self) -> dict[UserId, int]:
        """Number of records per user (the history size used for buckets)."""
        out: dict[UserId, int] = {}
        for ex in self._examples:
            out[ex.user_id] = out.get(ex.user_id, 0) + 1
        return out

    def inputs(self) -> list[str]:
        return [ex.input for ex in self._examples]

    def outputs(self) -> list[str]:
        return [ex.output for ex in self._examples]

    def user_ids(self) -> list[UserId]:
        return [ex.user_id for ex in self._examples]


def load_jsonl(path: Union[str, os.PathLike], *, time_key: Optional[str] = TIME_KEY) -> Dataset:
    """Read a JSONL file of ``{"user_id", "input", "output", ...}`` records.

    Raises :class:`DataError` ("FILE:LINE: reason") on the first malformed line: invalid
    JSON or UTF-8, a line that is not an object, a missing or empty required key, a
    ``user_id`` that is not an integer or string, a non-string ``input``/``output``, a
    duplicate key, NaN/Infinity, or (unless ``time_key`` is None) a ``time_key`` value that
    is not a finite number or an ISO-8601 date, or whose kind (number vs date) differs from
    the first timestamp of the file. A file with no records is an error too. Lines are split
    on ``\\n`` only (``\\r\\n`` works; U+2028 inside a string is not a line break).
    """
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    parsed: list[tuple[int, UserId, str, str, dict]] = []
    first_time: Optional[tuple[int, str]] = None
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 (byte {e.start})", path, lineno) from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float,
                             object_pairs_hook=_no_duplicates)
            uid, inp, out, extra = _record_from_obj(obj, time_key)
        except _LineError as e:
            raise DataError(str(e), path, lineno) from None
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path, lineno) from None
        except RecursionError:
            raise DataError("invalid JSON: nested too deeply", path, lineno) from None
        if time_key is not None and time_key in extra:
            kind = _time_kind(extra[time_key])
            if first_time is None:
                first_time = (lineno, kind)
            elif kind != first_time[1]:
                raise DataError(
                    f"{time_key!r} is a {kind} but line {first_time[0]} has a {first_time[1]}; "
                    "use one kind of timestamp per file", path, lineno)
        parsed.append((lineno, uid, inp, out, extra))
    if not parsed:
        raise DataError("no records", path)
    return Dataset((Example(uid, inp, out, extra, lineno) for lineno, uid, inp, out, extra in parsed), path)


def write_jsonl(examples: Iterable[Union[Example, Mapping]], path: Union[str, os.PathLike]) -> Path:
    """Write records (Examples or dicts with the required keys) as JSONL, atomically: into a
    temporary file in the same directory, fsync'd, then renamed over ``path``. If anything
    fails (a record that is not JSON-serialisable, NaN, an exception from the iterable) the
    temporary file is removed and an existing ``path`` is left as it was. Returns the path."""
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for i, ex in enumerate(examples):
                obj = ex.to_json() if isinstance(ex, Example) else dict(ex)
                for key in REQUIRED:
                    if key not in obj:
                        raise DataError(f"record {i} has no {key!r}", path)
                f.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")

    return atomic_write(path, write)


# --------------------------------------------------------------------------- UserIndex


def _sort_key(uid: UserId):
    return (0, uid, "") if isinstance(uid, int) else (1, 0, uid)


class UserIndex:
    """A fixed mapping from external user ids to bank rows ``0..N-1``.

    Ids keep their type (``"1"`` and ``1`` are different users). ``UserIndex(ids)`` keeps
    the given order; :meth:`from_examples` sorts (integers ascending, then strings by code
    point), so the mapping does not depend on file order. A user not in the index has no
    row: :meth:`row`/:meth:`rows` give -1 (cold start: the group path only).
    Save it next to the adapters with :meth:`save`/:meth:`to_json`.
    """

    def __init__(self, ids: Iterable[UserId]):
        ids = tuple(ids)
        rows: dict[UserId, int] = {}
        for i, uid in enumerate(ids):
            problem = _check_user_id(uid)
            if problem:
                raise DataError(f"user index entry {i}: {problem}")
            if uid in rows:
                raise DataError(f"user index entry {i}: duplicate user id {uid!r}")
            rows[uid] = i
        self._ids = ids
        self._rows = rows

    @classmethod
    def from_examples(cls, examples: Iterable[Example], order: str = "sorted") -> "UserIndex":
        """Every user of ``examples`` (usually the training split); ``order`` is "sorted"
        (default) or "first" (order of first appearance)."""
        ids = list(dict.fromkeys(ex.user_id for ex in examples))
        if order == "sorted":
            ids.sort(key=_sort_key)
        elif order != "first":
            raise ValueError(f"order must be 'sorted' or 'first', got {order!r}")
        return cls(ids)

    @property
    def ids(self) -> tuple[UserId, ...]:
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[UserId]:
        return iter(self._ids)

    def __contains__(self, uid) -> bool:
        return not isinstance(uid, bool) and uid in self._rows

    def __eq__(self, other) -> bool:
        if isinstance(other, UserIndex):
            return self._ids == other._ids and all(type(a) is type(b) for a, b in zip(self._ids, other._ids))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"UserIndex({len(self)} users)"

    def row(self, uid: UserId) -> int:
        """The bank row of ``uid``, -1 when it has none."""
        if isinstance(uid, bool) or not isinstance(uid, (numbers.Integral, str)):
            raise TypeError(f"user ids are integers or strings, got {type(uid).__name__}")
        if isinstance(uid, numbers.Integral):
            uid = int(uid)
        return self._rows.get(uid, -1)

    def rows(self, user_ids: Iterable[UserId]) -> Tensor:
        """LongTensor of bank rows, -1 for a user without a row."""
        return torch.tensor([self.row(u) for u in user_ids], dtype=torch.long)

    def user(self, row: int) -> UserId:
        """The user id of bank row ``row``."""
        if not 0 <= row < len(self._ids):
            raise IndexError(f"row {row} is out of range for {len(self._ids)} users")
        return self._ids[row]

    def parse(self, text: str) -> UserId:
        """The id a command-line argument names: the string itself if it is a known id,
        else the integer it spells if that is a known id; KeyError otherwise."""
        if text in self._rows:
            return text
        try:
            as_int = int(text)
        except ValueError:
            as_int = None
        if as_int is not None and as_int in self._rows:
            return as_int
        raise KeyError(f"unknown user {text!r} ({len(self)} users in the index)")

    def to_json(self) -> dict:
        return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "ids": list(self._ids)}

    @classmethod
    def from_json(cls, obj: Union[Mapping, str]) -> "UserIndex":
        """Inverse of :meth:`to_json`; also accepts the JSON text."""
        if isinstance(obj, str):
            try:
                obj = json.loads(obj)
            except json.JSONDecodeError as e:
                raise DataError(f"user index is not valid JSON: {e.msg}") from None
        if not isinstance(obj, Mapping) or obj.get("format") != INDEX_FORMAT:
            raise DataError(f"not a user index (expected \"format\": {INDEX_FORMAT!r})")
        if obj.get("version") != INDEX_VERSION:
            raise DataError(f"user index version {obj.get('version')!r} is not supported (expected {INDEX_VERSION})")
        ids = obj.get("ids")
        if not isinstance(ids, list):
            raise DataError("user index has no 'ids' list")
        return cls(ids)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the index as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_json(), ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "UserIndex":
        path = Path(path)
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except DataError as e:
            raise DataError(e.reason, path) from None


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    """Per-user train / validation / test parts (each in the original record order) and
    how they were made: ``mode`` is "time" or "random"."""

    train: Dataset
    val: Dataset
    test: Dataset
    mode: str

    def __iter__(self):
        return iter((self.train, self.val, self.test))


def _split_sizes(n: int, val: float, test: float) -> tuple[int, int]:
    """(n_val, n_test) for a history of n records (rules in the module docstring)."""
    n_test = 0
    if test > 0 and n >= 2:
        n_test = min(max(1, int(test * n + 0.5)), n - 1)
    n_val = 0
    room = n - n_test - 2  # val only while train keeps >= 2 records
    if val > 0 and room >= 1:
        n_val = min(max(1, int(val * n + 0.5)), room)
    return n_val, n_test


def split_by_user(dataset: Iterable[Example], val: float = 0.1, test: float = 0.1, seed: int = 0,
                  time_key: Optional[str] = TIME_KEY) -> Split:
    """Split every user's history into train / validation / test.

    Explicit mode (records carry ``extra["split"]``, one of "train", "val", "test", as
    ``proper data lamp`` writes them): each record goes where it says.

    Time mode (every record has ``extra[time_key]``): each user's records are ordered by
    time (ties by position in ``dataset``), the latest go to test and the ones before them to
    validation, so train never holds a record later than one in validation or test.
    Random mode (no record has it, or ``time_key`` is None): each user's records are shuffled
    by a generator seeded with (seed, user id), so a user's split does not depend on the
    other users. Some records with a timestamp and some without is a DataError (a silent
    fallback could leak the future). Sizes follow the short-history rules of the module
    docstring. Deterministic; the parts keep the dataset's record order.
    """
    examples = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    for name, frac in (("val", val), ("test", test)):
        if not (isinstance(frac, numbers.Real) and 0.0 <= frac < 1.0):
            raise ValueError(f"{name} must be a fraction in [0, 1), got {frac!r}")
    if val + test >= 1.0:
        raise ValueError(f"val + test must be < 1, got {val + test}")
    marked = [ex.extra.get(SPLIT_KEY) for ex in examples]
    if any(m is not None for m in marked):  # explicit mode: the records say their part
        bad = next((i for i, m in enumerate(marked) if m not in SPLIT_PARTS), None)
        if bad is not None:
            raise DataError(f"record has {SPLIT_KEY}={marked[bad]!r} where every record must have one of "
                            f"{SPLIT_PARTS} once any has", examples.source, examples[bad].line)
        parts = [Dataset((ex for ex, m in zip(examples, marked) if m == k), examples.source) for k in SPLIT_PARTS]
        return Split(parts[0], parts[1], parts[2], "explicit")
    has = [time_key is not None and time_key in ex.extra for ex in examples]
    mode = "time" if has and all(has) else "random"
    if mode == "random" and any(has):
        i = has.index(False)
        raise DataError(f"record has no {time_key!r} while others do (record {i})", examples.source,
                        examples[i].line)
    times: list[float] = []
    if mode == "time":
        kinds = {}
        for i, ex in enumerate(examples):
            v = ex.extra[time_key]
            try:
                times.append(parse_timestamp(v))
            except ValueError as e:
                raise DataError(f"{time_key!r} {e}", examples.source, ex.line) from None
            kinds.setdefault(_time_kind(v), i)
        if len(kinds) > 1:
            i = max(kinds.values())
            raise DataError(f"{time_key!r} mixes numbers and date strings (record {i})", examples.source,
                            examples[i].line)

    part = [0] * len(examples)  # 0 train, 1 val, 2 test
    positions: dict[UserId, list[int]] = {}
    for i, ex in enumerate(examples):
        positions.setdefault(ex.user_id, []).append(i)
    for uid, pos in positions.items():
        if mode == "time":
            order = sorted(pos, key=lambda i: (times[i], i))
        else:
            order = list(pos)
            random.Random(f"proper-split:{seed}:{type(uid).__name__}:{uid}").shuffle(order)
        n_val, n_test = _split_sizes(len(order), val, test)
        n_train = len(order) - n_val - n_test
        for i in order[n_train:n_train + n_val]:
            part[i] = 1
        for i in order[n_train + n_val:]:
            part[i] = 2
    parts = [Dataset((ex for ex, p in zip(examples, part) if p == k), examples.source) for k in range(3)]
    return Split(parts[0], parts[1], parts[2], mode)


# --------------------------------------------------------------------------- batching


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
