"""The op benchmark runs on the CPU (small shapes) and writes the documented JSON schema.

No speed is asserted (timing has no place in unit tests); only that every variant ran,
every time is a positive number and every variant computes the right function.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT_S = 60
VARIANTS = ("linear", "proper-torch", "naive-peft")
CASES = ("prefill", "decode")
MODES = ("forward", "backward", "full")
TOL_FP32 = 1e-4  # relative error of a float32 variant against the float64 oracle

ROW_KEYS = {
    "case", "device", "dtype", "shape", "variant", "backend", "mode", "median_ms", "p20_ms", "p80_ms", "reps",
    "peak_mem_mib", "bytes_moved", "GBps", "pct_of_bandwidth", "rel_err", "rel_err_grad", "rel_err_bench_dtype",
    "routing_mismatch", "backward_method", "input_sets", "ok", "error", "notes", "speedup_vs_naive",
    "ratio_to_linear",
}


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
    assert data["schema"] == "proper.bench_op/1"
    assert data["date"] and data["timestamp_utc"].startswith(data["date"])
    versions = data["versions"]
    for key in ("python", "torch", "triton", "proper", "cuda"):
        assert key in versions
    assert versions["torch"] and versions["python"] and versions["proper"]
    dev = data["device"]
    assert dev["type"] == "cpu" and dev["name"]
    assert dev["bandwidth_GBps"] > 0
    settings = data["settings"]
    assert settings["dtype"] == "fp32" and settings["quick"] is True
    assert settings["tolerance_fp32"] == TOL_FP32
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
        assert ROW_KEYS <= set(r), (where, ROW_KEYS - set(r))
        assert r["ok"] is True and r["error"] is None, where
        assert r["device"] == data["device"]["name"] and r["dtype"] == "fp32"
        assert set(r["shape"]) >= {"T", "in", "out", "E", "k", "r", "r_u", "users"}
        assert r["median_ms"] > 0 and 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], where
        assert r["peak_mem_mib"] is None  # measured on CUDA only
        assert r["rel_err"] <= TOL_FP32 and r["rel_err_grad"] <= TOL_FP32, where
        assert r["rel_err_bench_dtype"] <= TOL_FP32, where
        assert r["routing_mismatch"] == 0, where
        if r["mode"] == "backward":
            assert r["backward_method"] == "retain_graph", where
        if r["case"] == "decode" and r["mode"] == "forward":
            assert r["bytes_moved"] > 0 and r["GBps"] > 0 and r["pct_of_bandwidth"] > 0, where
        else:
            assert r["GBps"] is None
        if r["variant"].startswith("proper-"):
            assert r["backend"] == r["variant"][len("proper-"):]
    shapes = {r["case"]: r["shape"] for r in data["rows"]}
    assert shapes["decode"]["seq"] == 1 and shapes["decode"]["users_in_batch"] == shapes["decode"]["batch"]


@pytest.mark.slow
def test_markdown_next_to_json_and_printed_last(result):
    data, out, stdout = result
    md = out.with_suffix(".md").read_text()
    assert stdout.rstrip().endswith(md.rstrip())
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(data["rows"])  # header + one line per row

