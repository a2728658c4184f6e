"""The user index: user id -> bank row, saved next to a run as ``users.json``."""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Union

import torch
from torch import Tensor

from ..._fs import atomic_write_text
from .records import DataError, Example, UserId, _check_user_id

INDEX_FORMAT = "proper-user-index"
INDEX_VERSION = 1


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


