"""The LaMP metrics, and per-history-size buckets for the evaluation table.

* classification: ``accuracy`` (exact match after stripping whitespace) and ``macro_f1``;
* rating: ``rating_errors`` -> MAE and RMSE of outputs read as numbers; a prediction that is
  not a number counts as the worst rating (the end of the scale farther from the
  reference, as LaMP does) and is counted in ``unparsable``;
* generation: ``rouge`` -> mean ROUGE-1 and ROUGE-L F-measure per record, computed with
  Google's ``rouge-score`` package as LaMP does (its default tokenizer: lower-cased,
  non-alphanumeric characters dropped, no stemming; note that it drops non-ASCII text).

``score(kind, preds, refs)`` gives a task kind's metrics as one dict; ``score_by_bucket``
the same per history-size bucket (:func:`bucket_by_history`), with the number of users and
records in each bucket, plus an ``"all"`` row.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Iterable, Mapping, Optional, Sequence

__all__ = [
    "KINDS",
    "accuracy",
    "bucket_by_history",
    "bucket_labels",
    "macro_f1",
    "parse_rating",
    "rating_errors",
    "rouge",
    "score",
    "score_by_bucket",
]

KINDS = {
    "classification": ("accuracy", "f1"),
    "rating": ("mae", "rmse"),
    "generation": ("rouge1", "rougeL"),
}


def _pairs(preds: Sequence, refs: Sequence) -> tuple[list, list]:
    preds, refs = list(preds), list(refs)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not refs:
        raise ValueError("no predictions to score")
    return preds, refs


def _norm(x) -> str:
    return str(x).strip()


def accuracy(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of exact matches (surrounding whitespace ignored)."""
    preds, refs = _pairs(preds, refs)
    return sum(_norm(p) == _norm(r) for p, r in zip(preds, refs)) / len(refs)


def macro_f1(preds: Sequence[str], refs: Sequence[str], labels: Optional[Iterable[str]] = None) -> float:
    """Macro-averaged F1 over ``labels`` (default: the distinct references). A prediction
    outside the labels is a miss for its reference's label and belongs to no class; a label
    with no true and no predicted record scores 0 (as scikit-learn does)."""
    preds, refs = _pairs(preds, refs)
    preds = [_norm(p) for p in preds]
    refs = [_norm(r) for r in refs]
    labels = sorted(set(refs)) if labels is None else list(dict.fromkeys(_norm(l) for l in labels))
    if not labels:
        raise ValueError("no labels")
    total = 0.0
    for label in labels:
        tp = sum(p == label and r == label for p, r in zip(preds, refs))
        fp = sum(p == label and r != label for p, r in zip(preds, refs))
        fn = sum(p != label and r == label for p, r in zip(preds, refs))
        denom = 2 * tp + fp + fn
        total += 2 * tp / denom if denom else 0.0
    return total / len(labels)


def parse_rating(text) -> Optional[float]:
    """The number a prediction spells (surrounding whitespace ignored), or None."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        v = float(text)
    else:
        try:
            v = float(str(text).strip())
        except ValueError:
            return None
    return v if math.isfinite(v) else None


def rating_errors(preds: Sequence[str], refs: Sequence[str], scale: tuple[float, float] = (1, 5)) -> dict:
    """``{"mae", "rmse", "unparsable", "n"}``. Predictions that do not parse as a finite
    number count as the end of ``scale`` farther from the reference; references must parse
    (ValueError naming the first that does not)."""
    lo, hi = scale
    if not lo < hi:
        raise ValueError(f"scale must be (low, high) with low < high, got {scale!r}")
    preds, refs = _pairs(preds, refs)
    abs_err, sq_err, bad = 0.0, 0.0, 0
    for i, (p, r) in enumerate(zip(preds, refs)):
        y = parse_rating(r)
        if y is None:
            raise ValueError(f"reference {i} is not a number: {r!r}")
        x = parse_rating(p)
        if x is None:
            bad += 1
            x = lo if abs(y - lo) > abs(y - hi) else hi
        abs_err += abs(x - y)
        sq_err += (x - y) ** 2
    n = len(refs)
    return {"mae": abs_err / n, "rmse": math.sqrt(sq_err / n), "unparsable": bad, "n": n}


_SCORERS: dict = {}


def rouge(preds: Sequence[str], refs: Sequence[str], use_stemmer: bool = False) -> dict:
    """``{"rouge1", "rougeL"}``: mean F-measure over records (``rouge-score`` package)."""
    preds, refs = _pairs(preds, refs)
    scorer = _SCORERS.get(use_stemmer)
    if scorer is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError("ROUGE needs the 'rouge-score' package: pip install rouge-score") from e
        scorer = _SCORERS[use_stemmer] = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=use_stemmer)
    r1 = rl = 0.0
    for p, r in zip(preds, refs):
        s = scorer.score(str(r), str(p))  # score(target, prediction)
        r1 += s["rouge1"].fmeasure
        rl += s["rougeL"].fmeasure
    return {"rouge1": r1 / len(refs), "rougeL": rl / len(refs)}


def score(kind: str, preds: Sequence[str], refs: Sequence[str], *, labels: Optional[Iterable[str]] = None,
          scale: tuple[float, float] = (1, 5)) -> dict:
    """The metrics of a task kind: "classification" -> accuracy, f1; "rating" -> mae, rmse,
    unparsable; "generation" -> rouge1, rougeL."""
    if kind == "classification":
        return {"accuracy": accuracy(preds, refs), "f1": macro_f1(preds, refs, labels)}
    if kind == "rating":
        out = rating_errors(preds, refs, scale)
        del out["n"]
        return out
    if kind == "generation":
        return rouge(preds, refs)
    raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")


# --------------------------------------------------------------------------- buckets


def _check_edges(edges: Sequence[int]) -> tuple[int, ...]:
    edges = tuple(edges)
    if not edges or any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in edges) \
            or any(a >= b for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must be increasing positive integers, got {edges!r}")
    return edges


def _range_label(a: int, b: int) -> str:
    return str(a) if b - a == 1 else f"{a}-{b - 1}"


def bucket_labels(edges: Sequence[int] = (1, 5, 20)) -> list[str]:
    """Labels of the buckets, smallest first: for (1, 5, 20) "0", "1-4", "5-19", ">=20" (the
    first is for users with fewer than edges[0] training records, e.g. cold-start users)."""
    edges = _check_edges(edges)
    return ([_range_label(0, edges[0])] + [_range_label(a, b) for a, b in zip(edges, edges[1:])]
            + [f">={edges[-1]}"])


def _bucket(count: int, edges: tuple[int, ...], labels: list[str]) -> str:
    k = sum(count >= e for e in edges)
    return labels[k]


def bucket_by_history(users_train_counts: Mapping[Hashable, int], edges: Sequence[int] = (1, 5, 20)) -> dict:
    """User -> bucket label of their number of training records (see :func:`bucket_labels`)."""
    edges = _check_edges(edges)
    labels = bucket_labels(edges)
    out = {}
    for user, count in users_train_counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"history size of user {user!r} must be a non-negative integer, got {count!r}")
        out[user] = _bucket(count, edges, labels)
    return out


def score_by_bucket(kind: str, preds: Sequence[str], refs: Sequence[str], users: Sequence[Hashable],
                    users_train_counts: Mapping[Hashable, int], edges: Sequence[int] = (1, 5, 20),
                    **kw) -> dict[str, dict]:
    """``{bucket label: {metrics..., "users": distinct users, "records": n}}`` for every
    non-empty bucket in order, then ``"all"``. A user missing from ``users_train_counts``
    has 0 training records."""
    preds, refs = _pairs(preds, refs)
    users = list(users)
    if len(users) != len(refs):
        raise ValueError(f"{len(users)} users for {len(refs)} references")
    edges = _check_edges(edges)
    labels = bucket_labels(edges)
    of = [_bucket(int(users_train_counts.get(u, 0)), edges, labels) for u in users]
    table = {}
    for label in labels + ["all"]:
        idx = [i for i, b in enumerate(of) if label in ("all", b)]
        if not idx:
            continue
        row = score(kind, [preds[i] for i in idx], [refs[i] for i in idx], **kw)
        row["users"] = len({users[i] for i in idx})
        row["records"] = len(idx)
        table[label] = row
    return table


def adjusted_rand_index(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> float:
    """Adjusted Rand index of two clusterings of the same items (1: identical up to
    renaming; about 0: chance agreement). Hubert & Arabie (1985)."""
    a, b = list(labels_a), list(labels_b)
    if len(a) != len(b):
        raise ValueError(f"the clusterings have {len(a)} and {len(b)} items")
    n = len(a)
    if n < 2:
        return 1.0
    pairs = lambda k: k * (k - 1) / 2  # noqa: E731
    joint = Counter(zip(a, b))
    sum_joint = sum(pairs(c) for c in joint.values())
    sum_a = sum(pairs(c) for c in Counter(a).values())
    sum_b = sum(pairs(c) for c in Counter(b).values())
    expected = sum_a * sum_b / pairs(n)
    best = (sum_a + sum_b) / 2
    if best == expected:  # both clusterings trivial (one cluster, or all singletons)
        return 1.0
    return (sum_joint - expected) / (best - expected)
