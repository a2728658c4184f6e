"""Records: the JSONL format, its validation (one line-numbered error per malformed line),
``Example`` and ``Dataset``, reading and writing files."""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

from ..._fs import atomic_write

UserId = Union[int, str]
REQUIRED = ("user_id", "input", "output")
TIME_KEY = "timestamp"
SPLIT_KEY, SPLIT_PARTS = "split", ("train", "val", "test")  # a record's own part of the split


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


