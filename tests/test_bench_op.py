"""The op benchmark runs on the CPU (small shapes) and writes the one result schema.

No speed is asserted (timing has no place in unit tests); only that every variant ran and
every time is a positive number. That every benchmarked variant computes the right function
is tests/test_bench_oracle.py's job; that the rows have the keys of `proper bench`'s op rows,
tests/test_bench_schema.py's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proper.apps.bench import HEADER_FIELDS, ROW_FIELDS, SCHEMA

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 60
VARIANTS = ("linear", "proper-torch", "peft-moe")
CASES = ("prefill", "decode")
MODES = ("forward", "backward", "full")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "x.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_op", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIME_LIMIT_S,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), out, proc.stdout


@pytest.mark.slow
def test_header(result):
    data, _, _ = result
    assert data["schema"] == SCHEMA
    assert set(data) == set(HEADER_FIELDS), set(data) ^ set(HEADER_FIELDS)
    assert data["command"].startswith("python -m benchmarks.bench_op")
    assert data["date"] and data["timestamp_utc"].startswith(data["date"])
    versions = data["versions"]
    for key in ("python", "torch", "triton", "proper", "cuda", "git_commit"):
        assert key in versions
    assert versions["torch"] and versions["python"] and versions["proper"]
    dev = data["device"]
    assert dev["type"] == "cpu" and dev["name"]
    assert data["peaks"]["copy_gbps"] > 0 and data["peaks"]["matmul_tflops"] > 0
    settings = data["settings"]
    assert settings["dtype"] == "fp32" and settings["quick"] is True and settings["levels"] == ["op"]
    assert settings["timer"].startswith("time.perf_counter") and "element size" in settings["bytes_model"]
    # a backend that cannot run on the CPU is named in a note, not silently dropped
    assert any(n.startswith("proper-triton skipped") for n in data["notes"])
    assert any(n.startswith("proper-cuda skipped") for n in data["notes"])


@pytest.mark.slow
def test_every_variant_case_and_mode(result):
    data, _, _ = result
    rows = data["rows"]
    have = {(r["case"], r["mode"], r["variant"]) for r in rows}
    for case in CASES:
        for mode in MODES:
            for variant in VARIANTS:
                assert (case, mode, variant) in have, (case, mode, variant)
    assert len(have) == len(rows), "one row per (case, mode, variant)"
    assert not any(r["variant"] == "proper-triton" for r in rows), "no Triton interpreter in the benchmark"


@pytest.mark.slow
def test_rows(result):
    data, _, _ = result
    for r in data["rows"]:
        where = (r["case"], r["mode"], r["variant"])
        assert set(r) == set(ROW_FIELDS), (where, set(r) ^ set(ROW_FIELDS))
        assert r["ok"] is True and r["error"] is None, where
        assert r["level"] == "op" and r["device"] == data["device"]["type"] == "cpu" and r["dtype"] == "fp32"
        assert set(r["shape"]) >= {"tokens", "in", "out", "experts", "top_k", "rank", "user_rank", "users", "bank"}
        assert r["median_ms"] > 0 and 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], where
        assert len(r["times_ms"]) == r["reps"] and r["input_sets"] >= 1
        assert r["peak_mib"] is None  # measured on CUDA only
        assert r["ratio_to_floor"] > 0 and r["speedup_vs_peft"] > 0, where
        if r["mode"] == "backward":
            assert r["backward_method"] == "retain_graph", where
        else:
            assert r["backward_method"] is None, where
        if r["mode"] == "forward":  # the bytes a call must move, and the bandwidth they imply
            assert r["bytes"] > 0 and r["gbps"] > 0 and r["pct_of_copy"] > 0 and r["tflops"] > 0, where
        else:
            assert r["bytes"] is None and r["gbps"] is None and r["pct_of_copy"] is None, where
        if r["variant"].startswith("proper-"):
            assert r["backend"] == r["variant"][len("proper-"):]
    shapes = {r["case"]: r["shape"] for r in data["rows"]}
    assert shapes["decode"]["seq"] == 1 and shapes["decode"]["users"] == shapes["decode"]["batch"]
    assert shapes["prefill"]["routers"] == ["token", "user", "lora"]


@pytest.mark.slow
def test_markdown_next_to_json_and_printed_last(result):
    data, out, stdout = result
    md = out.with_suffix(".md").read_text()
    assert stdout.rstrip().endswith(md.rstrip())
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(data["rows"])  # header + one line per row

