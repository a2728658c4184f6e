"""What every phase of the GPU lease (benchmarks/lease.py) writes, as it goes.

A phase is a ``python -m benchmarks.NAME`` command. It appends each row it measures to the
file of ``--rows PATH`` the moment the row exists (one JSON object a line, flushed), so a
phase killed at its time limit keeps every row before the kill. Its last line of output is
``summary: <one line>``, which the lease records as the phase's summary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


def _plain(v):
    """JSON-safe: NaN and inf as strings, tuples as lists, anything else by str()."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


class RowSink:
    """Appends rows to `path` (None: keeps them in memory only); ``rows`` holds all written."""

    def __init__(self, path: Optional[Path], phase: Optional[str] = None):
        self.path = Path(path) if path else None
        self.phase = phase
        self.rows: list[dict] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> dict:
        row = _plain(dict(row, phase=self.phase) if self.phase and "phase" not in row else row)
        self.rows.append(row)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
        return row


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a last line cut off by a kill is dropped."""
    out = []
    if not Path(path).exists():
        return out
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def summary(text: str) -> None:
    """The phase's one-line summary: its last line of output."""
    print("summary: " + " ".join(str(text).split()), flush=True)
