"""proper.train.metrics against hand-computed values."""

import math

import pytest

from proper.train.metrics import (
    accuracy,
    bucket_by_history,
    bucket_labels,
    macro_f1,
    parse_rating,
    rating_errors,
    rouge,
    score,
    score_by_bucket,
)


def test_accuracy():
    assert accuracy(["a", " b ", "c", "d"], ["a", "b", "x", "y"]) == 0.5
    with pytest.raises(ValueError, match="2 predictions for 1"):
        accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])


def test_macro_f1_by_hand():
    refs = ["a", "a", "b", "b", "c"]
    preds = ["a", "b", "b", "b", "zzz"]
    # a: tp1 fp0 fn1 -> 2/3; b: tp2 fp1 fn0 -> 4/5; c: tp0 fp0 fn1 -> 0
    assert macro_f1(preds, refs) == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    # an extra label that never occurs scores 0 and counts in the mean
    assert macro_f1(preds, refs, labels=["a", "b", "c", "d"]) == pytest.approx((2 / 3 + 4 / 5) / 4)
    assert macro_f1(["x"], ["x"]) == 1.0


def test_rating_errors_by_hand():
    out = rating_errors(["1", "3.5", "five", " 2 "], ["2", "3", "4", "2"])
    # errors: 1, 0.5, unparsable vs 4 -> worst is 1 (farther end): 3, 0
    assert out["unparsable"] == 1 and out["n"] == 4
    assert out["mae"] == pytest.approx((1 + 0.5 + 3 + 0) / 4)
    assert out["rmse"] == pytest.approx(math.sqrt((1 + 0.25 + 9 + 0) / 4))
    # for a reference of 2 the farther end is 5
    assert rating_errors(["nan"], ["2"]) == {"mae": 3.0, "rmse": 3.0, "unparsable": 1, "n": 1}
    assert parse_rating("inf") is None and parse_rating(" 4 ") == 4.0 and parse_rating("4 stars") is None
    with pytest.raises(ValueError, match="reference 0 is not a number"):
        rating_errors(["1"], ["x"])


def test_rouge_by_hand():
    # ROUGE-1: 5 of 6 unigrams shared -> P = R = F = 5/6.
    # ROUGE-L: LCS("the cat sat on the mat", "the cat on the mat") = 5 -> P 1, R 5/6, F = 10/11
    out = rouge(["the cat on the mat"], ["the cat sat on the mat"])
    assert out["rouge1"] == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))
    assert out["rougeL"] == pytest.approx(10 / 11)
    # word order matters for L only; case and punctuation are ignored; mean over records
    out = rouge(["B a", "Hello!"], ["a b", "hello"])
    assert out["rouge1"] == pytest.approx(1.0)
    assert out["rougeL"] == pytest.approx((0.5 + 1.0) / 2)
    assert rouge(["x"], ["y"]) == {"rouge1": 0.0, "rougeL": 0.0}


def test_score_kinds():
    # labels = the references ({"a"}): tp 1, fp 0, fn 1 -> 2/3; "b" is only a miss
    assert score("classification", ["a", "b"], ["a", "a"]) == {"accuracy": 0.5, "f1": pytest.approx(2 / 3)}
    assert score("rating", ["1"], ["3"]) == {"mae": 2.0, "rmse": 2.0, "unparsable": 0}
    assert set(score("generation", ["a"], ["a"])) == {"rouge1", "rougeL"}
    with pytest.raises(ValueError, match="kind"):
        score("vibes", ["a"], ["a"])


def test_buckets():
    assert bucket_labels() == ["0", "1-4", "5-19", ">=20"]
    assert bucket_labels((2, 3)) == ["0-1", "2", ">=3"]
    counts = {"a": 1, "b": 4, "c": 5, "d": 19, "e": 20, 7: 500, "z": 0}
    assert bucket_by_history(counts) == {"a": "1-4", "b": "1-4", "c": "5-19", "d": "5-19", "e": ">=20",
                                         7: ">=20", "z": "0"}
    with pytest.raises(ValueError, match="increasing"):
        bucket_by_history(counts, edges=(5, 5))
    with pytest.raises(ValueError, match="non-negative"):
        bucket_by_history({"a": -1})


def test_score_by_bucket():
    users = ["a", "a", "b", "c", "cold"]
    preds = ["x", "y", "x", "x", "x"]
    refs = ["x", "x", "x", "y", "x"]
    table = score_by_bucket("classification", preds, refs, users, {"a": 2, "b": 3, "c": 30})
    assert list(table) == ["0", "1-4", ">=20", "all"]
    assert table["1-4"]["users"] == 2 and table["1-4"]["records"] == 3
    assert table["1-4"]["accuracy"] == pytest.approx(2 / 3)
    assert table[">=20"]["accuracy"] == 0.0 and table["0"]["accuracy"] == 1.0
    assert table["all"]["users"] == 4 and table["all"]["records"] == 5 and table["all"]["accuracy"] == 0.6


def test_adjusted_rand_index():
    from proper.train.metrics import adjusted_rand_index

    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 9, 9]) == 1.0  # the same up to renaming
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    # Hand-computed: a = [0,0,0,1,1,1], b = [0,0,1,1,2,2]; pair sums 2, 6, 3 over 15 pairs.
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx((2 - 6 * 3 / 15) / (4.5 - 1.2))
    with pytest.raises(ValueError, match="items"):
        adjusted_rand_index([0, 1], [0])
