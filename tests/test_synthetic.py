"""proper.train.synthetic: the built-in multi-user task is deterministic, has Pareto histories,
and has the population < group < user structure the three stages rely on."""

import os
import statistics

import pytest

from proper.train.data import Example, UserIndex, load_jsonl, split_by_user
from proper.train.synthetic import (
    LEVELS,
    SyntheticConfig,
    make_task,
    oracle_accuracy,
    oracle_predictions,
    write_jsonl,
)


@pytest.fixture(scope="module")
def task():
    return make_task()


def test_deterministic_from_the_seed(task):
    again = make_task(seed=0)
    assert again.examples == task.examples and again.truth == task.truth and again.styles == task.styles
    other = make_task(seed=1)
    assert other.examples != task.examples
    # users are generated independently: more users leave the first ones unchanged
    more = make_task(num_users=250)
    assert [e for e in more.examples if e.user_id in task.truth] == list(task.examples)


def test_schema_and_ground_truth(task):
    c = task.config
    assert c == SyntheticConfig() and c.num_users == 200 and c.num_groups == 4
    assert set(task.truth) == set(task.examples.users()) == {f"u{i:04d}" for i in range(200)}
    assert set(task.truth.values()) == set(range(4))
    for ex in task.examples:
        g = ex.extra["group"]
        assert g == task.truth[ex.user_id]
        assert ex.input == f"opinion on {ex.extra['topic']}"
        answer, style = ex.output.split()
        assert style == task.styles[ex.user_id] and answer in task.answers
        assert set(ex.input.split() + ex.output.split()) <= set(task.vocabulary())
        assert ex.output in task.labels()
    # on every topic the groups prefer different answers: one record identifies the group
    for p in range(len(task.topics)):
        assert len({task.preferences[g][p] for g in range(4)}) == 4
    # each user's history is in time order with timestamps 0..n-1
    for uid, exs in task.examples.by_user().items():
        assert [e.extra["timestamp"] for e in exs] == list(range(len(exs)))


def test_pareto_histories(task):
    sizes = list(task.examples.counts().values())
    assert sum(n <= 5 for n in sizes) / len(sizes) > 0.7
    assert sum(n == 1 for n in sizes) / len(sizes) > 0.35
    assert max(sizes) >= 10 * statistics.median(sizes)
    assert max(sizes) <= task.config.max_history


def test_oracles_are_ordered_population_group_user(task):
    split = task.split()
    acc = {level: oracle_accuracy(split, task.truth, level) for level in LEVELS}
    assert acc["group"] - acc["population"] >= 0.15, acc
    assert acc["user"] - acc["group"] >= 0.15, acc
    assert acc["user"] >= 0.95, acc
    # the same ordering on the sparsest users (1-4 training records)
    counts = split.train.counts()
    sparse = [e for e in split.test if counts[e.user_id] < 5]
    assert len(sparse) >= 30
    sp = {level: oracle_accuracy(split.train, task.truth, level, eval_on=sparse) for level in LEVELS}
    assert sp["population"] + 0.15 <= sp["group"] <= sp["user"] - 0.15, sp


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_oracle_ordering_holds_for_other_seeds(seed):
    t = make_task(seed=seed)
    split = t.split()
    acc = [oracle_accuracy(split, t.truth, level) for level in LEVELS]
    assert acc[0] + 0.15 <= acc[1] <= acc[2] - 0.15, acc


def test_oracle_by_hand():
    truth = {"a": 0, "b": 0, "c": 1}
    train = [Example("a", "opinion on dogs", "like truly"), Example("b", "opinion on dogs", "like indeed"),
             Example("b", "opinion on cats", "hate indeed"), Example("c", "opinion on dogs", "hate truly"),
             Example("c", "opinion on dogs", "hate truly")]
    test = [Example("a", "opinion on cats", "hate truly"), Example("c", "opinion on dogs", "hate truly")]
    # population: dogs -> hate (3 vs 2), cats -> hate; styles: truly 3, indeed 2
    assert oracle_predictions(train, truth, "population", test) == ["hate truly", "hate truly"]
    # group 0: dogs -> like, cats -> hate, style tie truly/indeed -> "indeed" (smallest)
    assert oracle_predictions(train, truth, "group", test) == ["hate indeed", "hate truly"]
    assert oracle_predictions(train, truth, "user", test) == ["hate truly", "hate truly"]
    assert oracle_accuracy(train, truth, "group", eval_on=test) == 0.5
    assert oracle_accuracy(train, truth, "user", eval_on=test) == 1.0
    with pytest.raises(ValueError, match="level"):
        oracle_accuracy(train, truth, "planet")


def test_task_file_roundtrip(task, tmp_path):
    path = task.write_jsonl(tmp_path / "task.jsonl")
    back = load_jsonl(path)
    assert [(e.user_id, e.input, e.output, e.extra) for e in back] == \
        [(e.user_id, e.input, e.output, e.extra) for e in task.examples]
    assert split_by_user(back).mode == "time"
    # the user index of the synthetic ids is their sorted order
    assert UserIndex.from_examples(back).ids == tuple(sorted(task.truth))
    write_jsonl(task.examples[:3], path)  # re-exported for convenience
    assert len(load_jsonl(path)) == 3 and os.listdir(tmp_path) == ["task.jsonl"]


def test_config_validation():
    with pytest.raises(ValueError, match="num_groups"):
        SyntheticConfig(num_groups=1)
    with pytest.raises(ValueError, match="noise"):
        SyntheticConfig(noise=1.0)
    with pytest.raises(ValueError, match="num_users"):
        make_task(num_users=0)
    t = make_task(num_groups=10, num_topics=14, num_styles=7, num_users=20, seed=5)
    assert len(set(t.answers)) == 10 and len(set(t.topics)) == 14 and len(set(t.style_words)) == 7


def test_records_asking_several_topics():
    t = make_task(num_users=60, topics_per_record=3, seed=2)
    assert t.config.topics_per_record == 3
    wrong = total = 0
    for ex in t.examples:
        topics = ex.extra["topics"]
        assert len(topics) == 3 == len(set(topics)) and ex.input == "opinion on " + " ".join(topics)
        *said, style = ex.output.split()
        assert style == t.styles[ex.user_id] and ex.output in t.labels()
        g = t.truth[ex.user_id]
        for topic, a in zip(topics, said):
            total += 1
            wrong += a != t.preferences[g][t.topics.index(topic)]
    assert wrong / total < 0.06  # the noise (0.02) only
    assert len(t.labels()) == 4 ** 3 * 3
    split = t.split()
    acc = [oracle_accuracy(split, t.truth, level) for level in LEVELS]
    assert acc[0] < acc[1] < acc[2]
    # one record per topic is the default and draws exactly what it always drew
    assert make_task(num_users=60, seed=2, topics_per_record=1).examples == make_task(num_users=60, seed=2).examples
    with pytest.raises(ValueError, match="topics_per_record"):
        SyntheticConfig(num_topics=4, topics_per_record=5)
