"""One result schema: `proper bench`'s op level and `python -m benchmarks.bench_op` write
rows with exactly the same keys, under a header with the same keys (device, versions, date,
settings and the rest), on tiny CPU sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proper.apps.bench import HEADER_FIELDS, ROW_FIELDS, SCHEMA

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list, cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    out = tmp_path_factory.mktemp("schema")
    _run(["-c", "import sys; from proper.apps.cli import main; sys.exit(main())", "bench", "--device", "cpu",
          "--quick", "--levels", "op", "--repeats", "2", "--no-compile", "--out", str(out / "suite")], ROOT)
    _run(["-m", "benchmarks.bench_op", "--device", "cpu", "--quick", "--repeats", "2", "--out",
          str(out / "op" / "op.json")], ROOT)
    (suite,) = (out / "suite").glob("*.json")
    return json.loads(suite.read_text()), json.loads((out / "op" / "op.json").read_text())


@pytest.mark.slow
def test_the_same_header_keys(both):
    suite, op = both
    assert suite["schema"] == op["schema"] == SCHEMA
    assert set(suite) == set(op) == set(HEADER_FIELDS)
    for key in ("device", "versions", "peaks", "settings"):
        assert set(suite[key]) == set(op[key]), (key, set(suite[key]) ^ set(op[key]))
    assert suite["settings"]["levels"] == op["settings"]["levels"] == ["op"]


@pytest.mark.slow
def test_the_same_row_keys(both):
    suite, op = both
    suite_rows = [r for r in suite["rows"] if r["level"] == "op"]
    assert suite_rows and len(suite_rows) == len(suite["rows"])
    assert op["rows"] and all(r["level"] == "op" for r in op["rows"])
    for r in suite_rows + op["rows"]:
        assert set(r) == set(ROW_FIELDS), (r["case"], r["variant"], set(r) ^ set(ROW_FIELDS))
        assert set(r["shape"]) == set(suite_rows[0]["shape"])
    # the same variants of the floor and the baseline, the same names for ours
    assert {"linear", "peft-moe"} <= {r["variant"] for r in suite_rows} & {r["variant"] for r in op["rows"]}
    assert {r["kind"] for r in suite_rows} == {r["kind"] for r in op["rows"]} == {"floor", "ours", "baseline"}
