"""The built-in multi-user task: users in latent groups, group preferences plus a personal
style, sparse Pareto histories. Deterministic from a seed; no download.

Generative story (defaults in brackets; every draw uses ``random.Random`` streams seeded
from ``seed``, one for the task and one per user, so adding users never changes the
others)::

    G groups [4], P topics [8], A = G answer words, S style words [3], k topics per record [1]

    for each topic p:   perm_p = a random permutation of the G answers
                        pref[g][p] = perm_p[g]      # on EVERY topic the G groups disagree
    for each user u:    group g_u ~ Uniform(G), style s_u ~ Uniform(S) (independent)
                        n_u = min(max_history [100], floor(U ** (-1 / alpha [1.0]))),  U ~ U(0, 1]
                        # Pareto: P(n >= k) = 1/k -> half the users have 1 record,
                        # 83% have <= 5, ~1% reach the cap; ~5.2 records per user on average
        for i in 0..n_u-1:  k distinct topics p_1..p_k ~ Uniform(P)
                            answer_j = pref[g_u][p_j], or with prob. noise [0.02] another answer
                            input  = "opinion on <topic_1> ... <topic_k>"
                            output = "<answer_1> ... <answer_k> <style>"   e.g. "like truly"
                            extra  = {"group": g_u, "timestamp": i, "topic": <topic>}  (k = 1)
                                     {"group": g_u, "timestamp": i, "topics": [...]}   (k > 1)

User ids are strings ``"u0000"``, ``"u0001"``, ... The answer depends on (group, topic)
only, the style on the user only, so:

* a population model (one answer per topic, one style) gets the answer of the largest
  group on each topic (~30%) and the commonest style (~1/S, more when a heavy user
  dominates the test records): exact-match accuracy ~0.1-0.25;
* a group-aware model gets the answer right (1 - noise) but not the style: ~0.35-0.55;
* a user-aware model on top of it also learns the style, which any single record of the
  user shows: ~1 - noise ~ 0.98, even for users with one training record.

Over seeds 0-29 (test split of ``split_by_user`` defaults) the oracle accuracies average
population 0.14, group 0.45, user 0.98, and the smallest gaps are 0.21 (group over
population) and 0.43 (user over group).

Because the groups disagree on every topic, one record identifies its user's group (up to
the noise), which is what lets a user-aware router place users with a single record. With
k = 1, though, a learner that does not know the groups can explain every one-record user
just as well with experts that mix groups topic by topic; with k > 1 each record ties k
answers of one group together, so only the true groups explain the data (the demo uses
k = 3). The accuracies quoted here are for k = 1.

Metric for the demo: exact-match accuracy of the whole output string (the classification
view: G * S labels; macro-F1 applies too); ROUGE-1/L gives partial credit (answer or style
right) for the generation view. :func:`oracle_accuracy` computes the best accuracy
reachable at each level from the training split, e.g. on the default task (seed 0, split
``split_by_user`` defaults, scored on test): population 0.144, group 0.496, user 0.976.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from .data import Dataset, Example, Split, UserId, split_by_user, write_jsonl

__all__ = [
    "LEVELS",
    "SyntheticConfig",
    "SyntheticTask",
    "make_task",
    "oracle_accuracy",
    "oracle_predictions",
    "write_jsonl",
]

TOPIC_WORDS = ("apples", "books", "cars", "dogs", "films", "games", "music", "parks",
               "rivers", "sports", "trains", "wine")
ANSWER_WORDS = ("love", "like", "dislike", "hate", "adore", "avoid", "enjoy", "ignore")
STYLE_WORDS = ("indeed", "truly", "honestly", "surely", "really", "frankly")
PROMPT = "opinion on {topic}"
LEVELS = ("population", "group", "user")


def _words(pool: Sequence[str], n: int, prefix: str) -> tuple[str, ...]:
    return tuple(pool[:n]) if n <= len(pool) else tuple(f"{prefix}{i}" for i in range(n))


def _randint(rng: random.Random, k: int) -> int:
    """Uniform in 0..k-1 from rng.random() alone (stable across Python versions)."""
    return min(int(rng.random() * k), k - 1)


def _permutation(rng: random.Random, k: int) -> list[int]:
    p = list(range(k))
    for i in range(k - 1, 0, -1):
        j = _randint(rng, i + 1)
        p[i], p[j] = p[j], p[i]
    return p


@dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 200
    num_groups: int = 4
    num_topics: int = 8
    num_styles: int = 3
    pareto_alpha: float = 1.0  # tail index of the history sizes (smaller: heavier tail)
    max_history: int = 100
    noise: float = 0.02  # probability that a record's answer is not the group's
    seed: int = 0
    topics_per_record: int = 1  # k distinct topics asked in one record (k answers, one style)

    def __post_init__(self):
        for name in ("num_users", "num_groups", "num_topics", "num_styles", "max_history", "topics_per_record"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.topics_per_record > self.num_topics:
            raise ValueError(f"topics_per_record ({self.topics_per_record}) must be at most num_topics "
                             f"({self.num_topics})")
        if self.num_groups < 2:
            raise ValueError(f"num_groups must be at least 2, got {self.num_groups}")
        if not (isinstance(self.pareto_alpha, (int, float)) and math.isfinite(self.pareto_alpha)
                and self.pareto_alpha > 0):
            raise ValueError(f"pareto_alpha must be a positive number, got {self.pareto_alpha!r}")
        if not (isinstance(self.noise, (int, float)) and 0.0 <= self.noise < 1.0):
            raise ValueError(f"noise must be in [0, 1), got {self.noise!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


@dataclass
class SyntheticTask:
    """The generated task: ``examples`` (a Dataset of every user's history, users in id
    order, each in time order), the ground truth ``truth`` (user -> group) and ``styles``
    (user -> style word), and the group preferences ``preferences[g][p]`` (answer word of
    group g on topic ``topics[p]``)."""

    config: SyntheticConfig
    examples: Dataset
    truth: dict[UserId, int]
    styles: dict[UserId, str]
    preferences: tuple[tuple[str, ...], ...]
    topics: tuple[str, ...]
    answers: tuple[str, ...]
    style_words: tuple[str, ...]
    prompt: str = field(default=PROMPT)

    def vocabulary(self) -> list[str]:
        """Every whitespace-separated word of every input and output (for a word-level
        tokenizer of a tiny demo model), in a fixed order."""
        return list(dict.fromkeys(PROMPT.format(topic="").split() + list(self.topics)
                                  + list(self.answers) + list(self.style_words)))

    def labels(self) -> list[str]:
        """Every possible output string (an answer per asked topic, then a style), for macro-F1."""
        heads = [""]
        for _ in range(self.config.topics_per_record):
            heads = [f"{h}{a} " for h in heads for a in self.answers]
        return [f"{h}{s}" for h in heads for s in self.style_words]

    def split(self, val: float = 0.1, test: float = 0.1, seed: int = 0) -> Split:
        """Per-user split by timestamp (see :func:`proper.train.data.split_by_user`)."""
        return split_by_user(self.examples, val=val, test=test, seed=seed)

    def write_jsonl(self, path: Union[str, os.PathLike]) -> Path:
        return write_jsonl(self.examples, path)


def make_task(config: Optional[SyntheticConfig] = None, **overrides) -> SyntheticTask:
    """Generate the task (see the module docstring). ``make_task(num_users=50, seed=3)``
    is ``make_task(SyntheticConfig(num_users=50, seed=3))``."""
    if config is None:
        config = SyntheticConfig(**overrides)
    elif overrides:
        config = SyntheticConfig(**{**config.__dict__, **overrides})
    c = config
    topics = _words(TOPIC_WORDS, c.num_topics, "topic")
    answers = _words(ANSWER_WORDS, c.num_groups, "answer")
    style_words = _words(STYLE_WORDS, c.num_styles, "style")

    rng = random.Random(f"proper-synthetic:{c.seed}:preferences")
    perms = [_permutation(rng, c.num_groups) for _ in topics]
    prefs = tuple(tuple(answers[perms[p][g]] for p in range(len(topics))) for g in range(c.num_groups))

    examples: list[Example] = []
    truth: dict[UserId, int] = {}
    styles: dict[UserId, str] = {}
    for u in range(c.num_users):
        uid = f"u{u:04d}"
        r = random.Random(f"proper-synthetic:{c.seed}:user:{u}")
        g = _randint(r, c.num_groups)
        style = style_words[_randint(r, c.num_styles)]
        uniform = 1.0 - r.random()  # in (0, 1]
        n = min(c.max_history, int(uniform ** (-1.0 / c.pareto_alpha)))
        truth[uid] = g
        styles[uid] = style
        for i in range(n):
            asked: list[int] = []
            said: list[str] = []
            for _ in range(c.topics_per_record):
                left = [q for q in range(len(topics)) if q not in asked]
                p = left[_randint(r, len(left))]
                answer = prefs[g][p]
                if r.random() < c.noise:
                    others = [a for a in answers if a != answer]
                    answer = others[_randint(r, len(others))]
                asked.append(p)
                said.append(answer)
            names = [topics[p] for p in asked]
            extra = {"group": g, "timestamp": i, "topic": names[0]} if len(names) == 1 else \
                {"group": g, "timestamp": i, "topics": names}
            examples.append(Example(uid, PROMPT.format(topic=" ".join(names)), " ".join(said + [style]), extra))
    return SyntheticTask(c, Dataset(examples), truth, styles, prefs, topics, answers, style_words)


# --------------------------------------------------------------------------- oracles


def _topics(ex: Example) -> list[str]:
    if isinstance(ex.extra.get("topics"), list):
        return list(ex.extra["topics"])
    if isinstance(ex.extra.get("topic"), str):
        return [ex.extra["topic"]]
    return ex.input.split()[2:]  # "opinion on <t1> <t2> ..."


def _answers_style(ex: Example) -> tuple[list[str], str]:
    parts = ex.output.split()
    if len(parts) != len(_topics(ex)) + 1:
        raise ValueError(f"not a synthetic-task output ('<answer per topic> <style>') for {ex.input!r}: {ex.output!r}")
    return parts[:-1], parts[-1]


def _majority(counter: Counter) -> Optional[str]:
    if not counter:
        return None
    best = max(counter.values())
    return min(k for k, v in counter.items() if v == best)  # ties: smallest string


def oracle_predictions(train: Iterable[Example], truth: Mapping[UserId, int], level: str,
                       eval_on: Iterable[Example]) -> list[str]:
    """The predictions of the best model at ``level`` estimated from ``train``, for each
    record of ``eval_on``. It knows the story's factorisation (output = answer + style,
    answer from (group, topic), style from the user) and the true groups ``truth``:

    * "population": majority answer per topic, majority style overall;
    * "group":      majority answer per (group, topic), majority style per group;
    * "user":       the group's answer (users have no answer of their own in the story)
                    and the majority style of the user's own training records.

    Each estimate falls back to the coarser one when it has no data (a topic a group never
    answered in train, a user without training records). Ties go to the smallest string.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    train = list(train)
    ans_pop: dict[str, Counter] = {}
    ans_grp: dict[tuple[int, str], Counter] = {}
    sty_pop: Counter = Counter()
    sty_grp: dict[int, Counter] = {}
    sty_usr: dict[UserId, Counter] = {}
    for ex in train:
        g = truth[ex.user_id]
        said, s = _answers_style(ex)
        for t, a in zip(_topics(ex), said):
            ans_pop.setdefault(t, Counter())[a] += 1
            ans_grp.setdefault((g, t), Counter())[a] += 1
        sty_pop[s] += 1
        sty_grp.setdefault(g, Counter())[s] += 1
        sty_usr.setdefault(ex.user_id, Counter())[s] += 1
    all_answers: Counter = sum(ans_pop.values(), Counter())
    preds = []
    for ex in eval_on:
        g = truth.get(ex.user_id)
        said = []
        for t in _topics(ex):
            answer = _majority(ans_pop.get(t, Counter())) or _majority(all_answers) or ""
            if level in ("group", "user"):
                answer = _majority(ans_grp.get((g, t), Counter())) or answer
            said.append(answer)
        style = _majority(sty_pop) or ""
        if level in ("group", "user"):
            style = _majority(sty_grp.get(g, Counter())) or style
        if level == "user":
            style = _majority(sty_usr.get(ex.user_id, Counter())) or style
        preds.append(" ".join(said + [style]))
    return preds


def oracle_accuracy(examples: Union[Split, Iterable[Example]], truth: Mapping[UserId, int], level: str, *,
                    eval_on: Optional[Iterable[Example]] = None) -> float:
    """Best exact-match accuracy reachable at ``level`` ("population" | "group" | "user").

    ``examples`` is either a :class:`~proper.train.data.Split` (estimate on ``train``, score on
    ``test``) or the training records, scored on ``eval_on`` (default: the training records
    themselves). See :func:`oracle_predictions` for the estimators.
    """
    if isinstance(examples, Split):
        train, scored = list(examples.train), list(examples.test if eval_on is None else eval_on)
    else:
        train = list(examples)
        scored = train if eval_on is None else list(eval_on)
    if not scored:
        raise ValueError("no records to score")
    preds = oracle_predictions(train, truth, level, scored)
    return sum(p == ex.output for p, ex in zip(preds, scored)) / len(scored)
