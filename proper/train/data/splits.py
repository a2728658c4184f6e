"""Per-user train/val/test splits (the rules are in the package docstring)."""

from __future__ import annotations

import numbers
import random
from dataclasses import dataclass
from typing import Iterable, Optional

from .records import SPLIT_KEY, SPLIT_PARTS, TIME_KEY, DataError, Dataset, Example, UserId, _time_kind, parse_timestamp


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


