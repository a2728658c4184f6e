"""The LaMP benchmark's files in proper's JSONL (``proper data lamp``).

LaMP publishes, per task, a questions file (a JSON list of ``{"id", "input", "profile":
[...]}``) and an outputs file (``{"task": "LaMP_N", "golds": [{"id", "output"}]}``). Each
question is one user: its profile items become that user's training records, mapped per
task as below, and the question itself is the user's test record (its gold output from the
outputs file). A profile's ``date``, when present, orders it. Every record carries
``split`` ("train" or "test": ``split_by_user`` then follows it) and ``task`` (so ``proper
eval`` picks the task's metric by itself).

  LaMP-1  citation identification  profile: title -> abstract             accuracy, F1
  LaMP-2  movie tagging            profile: description -> tag            accuracy, F1
  LaMP-3  product rating           profile: text -> score                 MAE, RMSE
  LaMP-4  news headlines           profile: text -> title                 ROUGE-1/L
  LaMP-5  scholarly titles         profile: abstract -> title             ROUGE-1/L
  LaMP-7  tweet paraphrasing       profile: the tweet as the output       ROUGE-1/L
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .data import DataError, Example, write_jsonl


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # the metric family of proper.train.metrics.score
    input_key: Optional[str]  # the profile item's field that is a record's input (None: a fixed prompt)
    output_key: str
    prompt: str = ""  # the input when input_key is None


TASKS = {
    "LaMP-1": Task("LaMP-1", "classification", "title", "abstract"),
    "LaMP-2": Task("LaMP-2", "classification", "description", "tag"),
    "LaMP-3": Task("LaMP-3", "rating", "text", "score"),
    "LaMP-4": Task("LaMP-4", "generation", "text", "title"),
    "LaMP-5": Task("LaMP-5", "generation", "abstract", "title"),
    "LaMP-7": Task("LaMP-7", "generation", None, "text", prompt="Write a tweet in your style:"),
}


def task_of(name: str) -> Task:
    key = name.replace("_", "-").strip()
    if key.lower().startswith("lamp-"):
        key = "LaMP-" + key[5:]
    if key not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[key]


def kind_of(task_name: str) -> str:
    """The metric kind of a LaMP task (proper.train.metrics.score)."""
    return task_of(task_name).kind


def _load(path: Union[str, os.PathLike], what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read the {what} file: {e.strerror}", str(path)) from None
    except ValueError as e:
        raise DataError(f"the {what} file is not JSON: {e}", str(path)) from None


def _text(value, where: str, source: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where} must be a string (or a number), got {type(value).__name__}", source)
    return str(value)


def convert(task: str, questions: Union[str, os.PathLike], outputs: Optional[Union[str, os.PathLike]] = None
            ) -> list[Example]:
    """Records of `task` from LaMP's files: every profile item as a training record of its
    question's user, then the question as that user's test record (its output the gold
    answer from `outputs`; without it, the test records have an empty output and serve
    generation only)."""
    t = task_of(task)
    qsrc = str(questions)
    qs = _load(questions, "questions")
    if not isinstance(qs, list):
        raise DataError(f"the questions file must hold a JSON list of questions, got {type(qs).__name__}", qsrc)
    golds: dict[str, str] = {}
    if outputs is not None:
        osrc = str(outputs)
        out = _load(outputs, "outputs")
        if not isinstance(out, dict) or not isinstance(out.get("golds"), list):
            raise DataError('the outputs file must be {"task": ..., "golds": [{"id", "output"}, ...]}', osrc)
        named = str(out.get("task", "")).replace("_", "-")
        if named and named.lower() != t.name.lower():
            raise DataError(f"the outputs file is for {out.get('task')!r}, not {t.name}", osrc)
        for i, g in enumerate(out["golds"]):
            if not isinstance(g, dict) or "id" not in g or "output" not in g:
                raise DataError(f"gold {i} must have 'id' and 'output'", osrc)
            golds[str(g["id"])] = _text(g["output"], f"gold {g['id']!r} output", osrc)
    records: list[Example] = []
    for qi, q in enumerate(qs):
        if not isinstance(q, dict) or "id" not in q or "input" not in q or not isinstance(q.get("profile"), list):
            raise DataError(f"question {qi} must have 'id', 'input' and a 'profile' list", qsrc)
        user = str(q["id"])
        profile = list(q["profile"])
        if profile and all(isinstance(p, dict) and "date" in p for p in profile):
            profile.sort(key=lambda p: str(p["date"]))
        for pi, item in enumerate(profile):
            where = f"question {user!r} profile item {pi}"
            if not isinstance(item, dict) or t.output_key not in item or (t.input_key and t.input_key not in item):
                raise DataError(f"{where} must have {', '.join(k for k in (t.input_key, t.output_key) if k)}", qsrc)
            extra = {"split": "train", "task": t.name}
            if "date" in item:
                extra["date"] = item["date"]
            inp = _text(item[t.input_key], where, qsrc) if t.input_key else t.prompt
            records.append(Example(user, inp, _text(item[t.output_key], where, qsrc), extra))
        if outputs is not None and user not in golds:
            raise DataError(f"question {user!r} has no gold output in the outputs file", str(outputs))
        records.append(Example(user, _text(q["input"], f"question {user!r} input", qsrc), golds.get(user, ""),
                               {"split": "test", "task": t.name}))
    return records


def write(task: str, questions, outputs, out_dir: Union[str, os.PathLike]) -> Path:
    """Convert and write ``<out_dir>/<task>.jsonl``; returns its path."""
    records = convert(task, questions, outputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_jsonl(records, out / f"{task_of(task).name}.jsonl")
