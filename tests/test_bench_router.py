"""The router_topk benchmark runs on the CPU and writes the harness's one schema (its numbers
are not asserted: speed goals live in the committed results)."""

import json

from benchmarks.bench_router import cases, main
from proper.apps.bench.schema import HEADER_FIELDS, ROW_FIELDS, SCHEMA


def test_router_benchmark_writes_the_one_schema(tmp_path):
    out = tmp_path / "router.json"
    assert main(["--device", "cpu", "--repeats", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == SCHEMA and set(data) == set(HEADER_FIELDS)
    rows = data["rows"]
    assert {tuple(sorted(r)) for r in rows} == {tuple(sorted(ROW_FIELDS))}
    assert len(rows) == len(cases(True)) * 2  # the torch backend on the CPU, forward and full
    for r in rows:
        assert r["ok"] and r["level"] == "router" and r["median_ms"] > 0 and r["bytes"] > 0
        assert r["ratio_to_floor"] == 1.0 and r["kind"] == "floor"  # the torch row is the floor
    assert out.with_suffix(".md").read_text().count("| router |") == len(rows)
