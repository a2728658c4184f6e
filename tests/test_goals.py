"""benchmarks/goals.py, the speed-goal phase of the GPU lease, run on the CPU at its --smoke
shapes: its timed calls do no host sync (and the guard would see one), it writes each row the
moment it is measured, its bandwidth share is of the copy bandwidth measured in the run, and
it writes the profile rows and the (skipped on the CPU) CUDA-graph decode variant. No timing
value is asserted: the smoke run's numbers mean nothing."""

import json
import math

import pytest
import torch

import proper_kernels
from benchmarks import goals
from benchmarks.rows import read_rows
from proper.apps.bench.timing import HostSyncError, no_host_sync
from proper_kernels import cost
from proper_kernels.launch import interpreting

CPU = torch.device("cpu")
CHECKED = ("linear_forward", "layer_forward", "op_forward", "linear_train", "frozen_train", "layer_train")


def fake_peaks(device, dtype, quick):
    """measure_peaks' keys with a copy bandwidth no table holds (and no timing spent)."""
    return dict(matmul_tflops=1.0, matmul="fake", copy_gbps=12.5, copy="fake copy")


def run_goals(tmp, *args):
    """goals.main at its smoke shapes, in this process: (exit status, the JSON, the rows file's rows)."""
    rc = goals.main(["--smoke", "--out", str(tmp), "--rows", str(tmp / "rows.jsonl"), *args])
    js = json.loads(next(tmp.glob("goals-smoke*.json")).read_text())
    return rc, js, read_rows(tmp / "rows.jsonl")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One full smoke run (both default cases, the profile, the peaks measured for real)."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("goals")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc, js, rows = run_goals(tmp)
    return dict(rc=rc, json=js, rows=rows, stdout=out.getvalue(), md=next(tmp.glob("goals-smoke-*.md")).read_text())


def goal_rows(rows):
    return {r["case"]: r for r in rows if r["record"] == "goal"}


def test_the_smoke_run_passes_and_ends_with_its_summary(smoke):
    assert smoke["rc"] == 0, smoke["json"]["failures"]
    assert smoke["stdout"].rstrip().splitlines()[-1].startswith("summary: goals torch on CPU")
    assert smoke["json"]["finished"] and not smoke["json"]["errors"]
    assert set(goal_rows(smoke["rows"])) == {"prefill-smoke", "decode-smoke"}
    assert [r["case"] for r in smoke["json"]["rows"]] == ["prefill-smoke", "decode-smoke"]
    assert all(r["phase"] == "goals-torch" for r in smoke["rows"])
    for key in ("layer_forward_vs_linear", "layer_train_vs_frozen_linear", "layer_train_vs_trained_linear",
                "naive_vs_layer", "op_bandwidth_fraction", "predicted"):
        assert all(key in r for r in smoke["json"]["rows"]), key


def test_the_timed_closures_do_no_host_sync(smoke):
    for row in goal_rows(smoke["rows"]).values():
        assert row["host_sync_free"] == {**{n: True for n in CHECKED}, "naive_forward": None}, row["case"]
        assert row["host_sync_errors"] == {} and "syncs by design" in row["notes"]["naive_forward"]


def _layer_call(check_user_ids):
    """One layer call of the decode smoke case, checking its ids (the old way) or not."""
    c = goals.smoke_case(cost.case("decode"))
    n_users = c.users * 4
    t = goals.tensors(c, CPU, torch.float32, n_users)
    plan = proper_kernels.build_plan(t["user_ids"], t["x"].shape[:-1], CPU, n_users)
    ps = {n: t[n] for n in ("lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")}
    return lambda: proper_kernels.proper_linear(
        t["x"], t["x"] @ t["weight"].t(), scaling=2.0, top_k=c.k, user_ids=t["user_ids"], user_scaling=1.0,
        backend="torch", plan=plan, check_user_ids=check_user_ids, **ps)


def test_the_guard_sees_the_per_call_id_check():
    """Not vacuous: validating the ids inside the call (check_user_ids=True) is a host sync."""
    with no_host_sync(CPU):
        _layer_call(False)()
    with pytest.raises(HostSyncError), no_host_sync(CPU):
        _layer_call(True)()
    found = goals.sync_check({"layer_forward": _layer_call(True), "naive_forward": _layer_call(True)}, {}, CPU)
    assert list(found) == ["layer_forward"] and "host" in found["layer_forward"]


def test_a_variant_that_syncs_fails_the_phase_and_still_writes_its_row(tmp_path, monkeypatch, capsys):
    real = proper_kernels.proper_linear
    monkeypatch.setattr(proper_kernels, "proper_linear", lambda *a, **k: real(*a, **{**k, "check_user_ids": True}))
    monkeypatch.setattr(goals, "measure_peaks", fake_peaks)
    rc, js, rows = run_goals(tmp_path, "--cases", "decode", "--no-profile")
    assert rc == 1
    row = goal_rows(rows)["decode-smoke"]
    assert row["host_sync_free"]["layer_forward"] is False and row["host_sync_free"]["layer_train"] is False
    assert row["host_sync_free"]["linear_forward"] is True
    assert js["rows"][0]["case"] == "decode-smoke" and any("layer_forward syncs" in f for f in js["failures"])
    assert "FAILED" in capsys.readouterr().out.rstrip().splitlines()[-1]
    assert not [r for r in rows if r["record"] == "profile"]  # --no-profile


def test_each_row_is_written_the_moment_it_is_measured(tmp_path, monkeypatch):
    """A run killed during its second case has the first case's row in --rows and in the JSON."""
    class Killed(BaseException):
        pass

    real, seen = goals.measure, {}

    def measure(c, run):
        if c.name == "decode-smoke":
            seen["rows"] = read_rows(tmp_path / "rows.jsonl")
            seen["json"] = json.loads(next(tmp_path.glob("goals-smoke-*.json")).read_text())
            raise Killed
        return real(c, run)

    monkeypatch.setattr(goals, "measure", measure)
    monkeypatch.setattr(goals, "measure_peaks", fake_peaks)
    with pytest.raises(Killed):
        goals.main(["--smoke", "--no-profile", "--out", str(tmp_path), "--rows", str(tmp_path / "rows.jsonl")])
    assert [r["record"] for r in seen["rows"]] == ["peaks", "goal"]
    assert seen["rows"][1]["case"] == "prefill-smoke"
    assert [r["case"] for r in seen["json"]["rows"]] == ["prefill-smoke"] and not seen["json"]["finished"]
    assert "prefill-smoke" in next(tmp_path.glob("goals-smoke-*.md")).read_text()


def test_a_failing_case_is_an_error_row_and_the_others_still_run(tmp_path, monkeypatch):
    real = goals.measure

    def measure(c, run):
        if c.name == "prefill-smoke":
            raise RuntimeError("boom")
        return real(c, run)

    monkeypatch.setattr(goals, "measure", measure)
    monkeypatch.setattr(goals, "measure_peaks", fake_peaks)
    rc, js, rows = run_goals(tmp_path)
    assert rc == 1
    assert [(r["record"], r.get("case")) for r in rows] == [("peaks", None), ("error", "prefill-smoke"),
                                                            ("goal", "decode-smoke")]
    assert js["errors"][0]["error"] == "RuntimeError: boom" and js["finished"]


def _bandwidth_checks(row, copy_gbps):
    assert row["copy_gbps"] == copy_gbps
    assert math.isclose(row["op_gbps"], row["op_bytes"] / row["times_s"]["op_forward"] / 1e9, rel_tol=1e-9)
    assert math.isclose(row["op_bandwidth_fraction"], row["op_gbps"] / copy_gbps, rel_tol=1e-9)


def test_the_bandwidth_share_is_of_the_copy_bandwidth_measured_in_the_run(smoke, tmp_path, monkeypatch):
    measured = smoke["json"]["peaks"]["copy_gbps"]
    assert [r["copy_gbps"] for r in smoke["rows"] if r["record"] == "peaks"] == [measured]
    for row in goal_rows(smoke["rows"]).values():
        _bandwidth_checks(row, measured)
        assert row["op_bandwidth_fraction_nominal"] is None and row["nominal_gbps"] is None  # no data sheet on a CPU
    monkeypatch.setattr(goals, "measure_peaks", fake_peaks)  # another measurement, another denominator
    _, _, rows = run_goals(tmp_path, "--cases", "decode", "--no-profile")
    _bandwidth_checks(goal_rows(rows)["decode-smoke"], 12.5)


def test_the_profile_rows_and_the_skipped_cuda_graph_variant(smoke):
    prof = [r for r in smoke["rows"] if r["record"] == "profile"]
    assert prof and prof == smoke["json"]["profile"]
    assert {r["case"] for r in prof} == {"prefill-smoke"} and {r["activity"] for r in prof} == {"cpu"}
    assert len({r["name"] for r in prof}) == len(prof) and all(r["count"] >= 1 for r in prof)
    assert any(r["name"] == "aten::mm" for r in prof)
    rows = goal_rows(smoke["rows"])
    decode, prefill = rows["decode-smoke"], rows["prefill-smoke"]
    assert decode["graph"] == {"status": "skipped", "note": goals.CPU_GRAPH_NOTE}
    assert all(decode["times_s"][f"{n}_graph"] is None for n in goals.FORWARD)
    assert decode["op_bandwidth_fraction_graph"] is None and decode["layer_forward_vs_linear_graph"] is None
    assert prefill["graph"] is None and "layer_forward_graph" not in prefill["times_s"]
    assert "Kernels of one forward+backward" in smoke["md"] and "| decode-smoke |" in smoke["md"]


@pytest.mark.parametrize("args,names", [(["--backend", "cuda"], "--backend"), (["--cases", "nope"], "--cases")])
def test_usage_errors_name_the_argument(tmp_path, capsys, args, names):
    assert goals.main(["--smoke", "--out", str(tmp_path), *args]) == 2
    out = capsys.readouterr()
    assert names in out.err and out.out.rstrip().splitlines()[-1].startswith(f"summary: goals not run: {names}")


@pytest.mark.skipif(not interpreting(), reason="the Triton path on the CPU needs TRITON_INTERPRET=1")
def test_the_triton_path_runs_under_the_interpreter(tmp_path, monkeypatch):
    """The lease's dry run: --backend triton on the CPU, the kernels in the interpreter."""
    monkeypatch.setattr(goals, "measure_peaks", fake_peaks)
    rc = goals.main(["--smoke", "--backend", "triton", "--cases", "decode", "--no-profile", "--out", str(tmp_path)])
    row = json.loads(next(tmp_path.glob("goals-smoke-triton-*.json")).read_text())["rows"][0]
    assert rc == 0 and row["backend"] == "triton" and row["op_bytes_model"] == "Triton launch plan"
    assert all(row["host_sync_free"][n] for n in CHECKED)
