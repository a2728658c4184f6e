"""LaMP's published files in, end to end: `proper data lamp` converts small files written in
the benchmark's schema, `proper train` trains on the profiles, and `proper eval` scores the
questions with the task's own metric."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from proper.train import lamp
from proper.apps.cli import main
from proper.train.data import load_jsonl, split_by_user
from proper.apps.demo import tiny_llama, word_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "drama", "comedy", "horror", "1", "2", "3", "4", "5",
         "title", "paper", "review", "movie", "good", "bad", "great"]


def lamp_files(tmp_path: Path, task: str, users: int = 4, items: int = 5):
    """A questions file and an outputs file in LaMP's schema for `task`."""
    rng = random.Random(task)
    words = lambda n: " ".join(rng.choice(WORDS[:8] + WORDS[13:]) for _ in range(n))  # noqa: E731
    out_of = {"LaMP-2": lambda: rng.choice(["drama", "comedy", "horror"]),
              "LaMP-3": lambda: rng.choice(["1", "2", "3", "4", "5"]),
              "LaMP-5": lambda: words(3)}[task]
    item = {"LaMP-2": lambda d: {"id": "p", "description": words(6), "tag": out_of(), "date": d},
            "LaMP-3": lambda d: {"id": "p", "text": words(6), "score": out_of(), "date": d},
            "LaMP-5": lambda d: {"id": "p", "abstract": words(6), "title": out_of(), "date": d}}[task]
    questions, golds = [], []
    for u in range(users):
        profile = [item(f"2020-01-{items - i:02d}") for i in range(items)]  # dates out of order
        questions.append({"id": f"{task}-q{u}", "input": words(6), "profile": profile})
        golds.append({"id": f"{task}-q{u}", "output": out_of()})
    q, o = tmp_path / f"{task}-questions.json", tmp_path / f"{task}-outputs.json"
    q.write_text(json.dumps(questions))
    o.write_text(json.dumps({"task": task.replace("-", "_"), "golds": golds}))
    return q, o


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lamp-model")
    tok = word_tokenizer(WORDS)
    tiny_llama(len(tok), 32, 1, seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_conversion_maps_profiles_to_training_records_and_questions_to_tests(tmp_path):
    q, o = lamp_files(tmp_path, "LaMP-3")
    records = lamp.convert("LaMP_3", q, o)  # LaMP's own spelling is accepted
    questions = json.loads(q.read_text())
    golds = {g["id"]: g["output"] for g in json.loads(o.read_text())["golds"]}
    assert len(records) == len(questions) * (1 + len(questions[0]["profile"]))
    first = [r for r in records if r.user_id == questions[0]["id"]]
    train, test = first[:-1], first[-1]
    assert [r.extra["date"] for r in train] == sorted(p["date"] for p in questions[0]["profile"])  # by date
    by_date = sorted(questions[0]["profile"], key=lambda p: p["date"])
    assert [(r.input, r.output) for r in train] == [(p["text"], p["score"]) for p in by_date]
    assert (test.input, test.output, test.extra) == (questions[0]["input"], golds[questions[0]["id"]],
                                                      {"split": "test", "task": "LaMP-3"})
    path = lamp.write("LaMP-3", q, o, tmp_path / "out")
    split = split_by_user(load_jsonl(path))
    assert split.mode == "explicit" and len(split.test) == len(questions) and len(split.val) == 0
    assert {ex.user_id for ex in split.test} == {qq["id"] for qq in questions}


@pytest.mark.parametrize("bad,pattern", [
    ({"task": "LaMP_2", "golds": []}, "is for 'LaMP_2', not LaMP-3"),
    ({"golds": [{"id": "x"}]}, "gold 0 must have 'id' and 'output'"),
    ({"task": "LaMP_3", "golds": []}, "has no gold output"),
])
def test_bad_lamp_files_name_the_file(tmp_path, bad, pattern):
    q, o = lamp_files(tmp_path, "LaMP-3")
    o.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=pattern):
        lamp.convert("LaMP-3", q, o)
    with pytest.raises(ValueError, match="--task must be one of"):
        lamp.convert("LaMP-6", q, o)


@pytest.mark.parametrize("task,metrics", [
    ("LaMP-2", {"accuracy", "f1"}),
    ("LaMP-3", {"mae", "rmse"}),
    ("LaMP-5", {"rouge1", "rougeL"}),
])
def test_lamp_end_to_end_with_the_tasks_metric(tmp_path, model_dir, capsys, task, metrics):
    q, o = lamp_files(tmp_path, task)
    assert main(["data", "lamp", "--task", task, "--questions", str(q), "--outputs", str(o),
                 "--out", str(tmp_path / "data")]) == 0
    data = Path(capsys.readouterr().out.strip())
    assert data == tmp_path / "data" / f"{task}.jsonl"
    common = ["--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "run"), "--max-length", "24"]
    assert main(["train", *common, "--steps", "2", "--save-every", "2", "--experts", "2", "--rank", "2",
                 "--user-rank", "2", "--batch-size", "4"]) == 0
    capsys.readouterr()
    preds = tmp_path / "preds.jsonl"
    assert main(["eval", *common, "--max-new-tokens", "3", "--predictions", str(preds)]) == 0  # the task's metric
    table = json.loads(capsys.readouterr().out)
    assert metrics <= set(table["all"]), table["all"]
    assert table["all"]["records"] == 4 and table["all"]["users"] == 4
    assert set(table["per_user"]) == {f"{task}-q{u}" for u in range(4)}
    assert all(metrics <= set(row) and row["records"] == 1 for row in table["per_user"].values())
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    golds = {g["id"]: g["output"] for g in json.loads(o.read_text())["golds"]}
    assert [(r["user_id"], r["reference"]) for r in lines] == [(u, golds[u]) for u in sorted(golds)]
    assert all(set(r) == {"user_id", "input", "reference", "prediction"} for r in lines)


def test_data_lamp_refusals_are_one_line(tmp_path):
    q, _ = lamp_files(tmp_path, "LaMP-2")
    for argv, pattern in (
        (["--task", "LaMP-9", "--questions", str(q)], "--task must be one of LaMP-1"),
        (["--task", "LaMP-2", "--questions", str(tmp_path / "nope.json")], "--questions: no file at"),
    ):
        out = subprocess.run([sys.executable, "-m", "proper.apps.cli", "data", "lamp", *argv, "--out", str(tmp_path / "d")],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and pattern in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
