"""The GPU lease script (benchmarks/run_gpu.sh -> benchmarks/lease.py), tested on the CPU by
its dry run, so that its first meeting with a GPU is not its first run: at most 8 files in
$OUT, each under 16 MiB; every phase listed in status.json; a budget that runs out keeps
what the phases before it measured; a failed build skips the CUDA phases with its log's
tail; a SIGTERM still packs the results. And the correctness phase's own checks fail on a
wrong or unwritten result."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_correct, lease
from benchmarks.rows import RowSink, read_rows

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES, MAX_BYTES = 8, 16 << 20


def lease_env(out: Path) -> dict:
    """run_gpu.sh runs the first python on PATH: this test's."""
    return dict(os.environ, OUT=str(out), PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))


def run_lease(out: Path, *args, timeout=600):
    env = lease_env(out)
    t0 = time.time()
    proc = subprocess.run(["bash", "benchmarks/run_gpu.sh", "--dry-run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - t0


def check_files(out: Path) -> tuple[dict, dict]:
    files = [f for f in out.rglob("*") if f.is_file()]
    assert sorted(f.name for f in files) == ["logs.tar.gz", "results.json", "status.json"], files
    assert len(files) <= MAX_FILES and all(f.stat().st_size < MAX_BYTES for f in files)
    status = json.loads((out / "status.json").read_text())
    results = json.loads((out / "results.json").read_text())
    for p in status["phases"]:
        assert set(p) >= {"name", "state", "seconds", "summary"} and p["state"] in lease.STATES, p
        assert isinstance(p["summary"], str) and "\n" not in p["summary"]
    for key in ("device", "versions", "budget_s", "date"):
        assert key in status and key in results
    return status, results


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lease")
    proc, seconds = run_lease(out)
    return out, proc, seconds


def test_the_dry_run_lists_every_phase_in_at_most_three_files(dry_run):
    out, proc, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status, results = check_files(out)
    names = [p["name"] for p in status["phases"]]
    assert names == ["build"] + [p.name for p in lease.PHASES if p.default]
    by = {p["name"]: p for p in status["phases"]}
    assert by["build"]["state"] == "ok", by["build"]
    for name in ("correct-triton", "correct-cuda", "lane", "goals-triton", "goals-cuda"):
        assert by[name]["state"] == "ok", by[name]
    for name in ("memcheck-small", "memcheck-tiles", "racecheck"):
        assert by[name]["state"] == "skipped" and "GPU" in by[name]["summary"]
    assert by["triton-cache"]["state"] == "skipped" and "dry run" in by["triton-cache"]["summary"]
    for phase in lease.PHASES:  # each phase's rows file is the one the lease reads (it passes --rows itself)
        if phase.rows and by.get(phase.name, {}).get("state") == "ok":
            assert by[phase.name]["rows"] > 0, phase.name
    # Every case of both correctness phases has its row, within tolerance on the CPU.
    correct = [r for r in results["rows"] if r.get("phase", "").startswith("correct-")]
    assert {r["case"] for r in correct if r["backend"] == "triton"} == {c.name for c in gpu_correct.CASES}
    assert all(r["state"] == "ok" for r in correct)
    assert any(r.get("phase") == "goals-triton" for r in results["rows"])
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = tar.getnames()
    assert {f"logs/{n}.log" for n in ("build", "correct-triton", "lane", "goals-triton")} <= set(logs)


def test_a_short_budget_times_out_and_keeps_the_phases_before(tmp_path):
    proc, seconds = run_lease(tmp_path, "--budget", "30")
    assert seconds < 90, seconds
    status, results = check_files(tmp_path)
    phases = status["phases"]
    assert [p["name"] for p in phases] == ["build"] + [p.name for p in lease.PHASES if p.default]
    states = [p["state"] for p in phases[1:]]
    assert "timeout" in states or "skipped" in states
    assert phases[1]["name"] == "triton-cache" and phases[1]["state"] == "skipped"  # nothing to install on the CPU
    first = phases[2]
    assert first["name"] == "correct-triton" and first["state"] == "ok", first
    assert sum(r.get("phase") == "correct-triton" for r in results["rows"]) == len(gpu_correct.CASES)
    assert proc.returncode in (0, 3), proc.stdout[-2000:]  # 3: a phase timed out, none failed


def test_a_sigterm_still_packs_the_results(tmp_path):
    env = lease_env(tmp_path)
    proc = subprocess.Popen(["bash", "benchmarks/run_gpu.sh", "--dry-run"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "status.json").exists():
        time.sleep(0.2)
    time.sleep(4)
    os.killpg(proc.pid, signal.SIGTERM)
    said = proc.communicate(timeout=60)[0]
    status, _ = check_files(tmp_path)
    states = {p["name"]: p["state"] for p in status["phases"]}
    assert set(states) == {"build"} | {p.name for p in lease.PHASES if p.default}, said
    assert any(s in ("timeout", "skipped") for s in states.values())
    stopped = [p for p in status["phases"] if p["summary"].startswith("the lease was stopped")]
    assert stopped and stopped[0]["state"] in ("timeout", "skipped"), status["phases"]
    assert proc.returncode == 128 + signal.SIGTERM, said


def test_a_failed_build_skips_the_cuda_phases_with_its_log(tmp_path):
    run = lease.Run(dry_run=False, work=tmp_path, cores=2)
    build = lease.Build(run)
    build.log.write_text("nvcc fatal   : Unsupported gpu architecture 'compute_99'\n")
    build.started = time.time()
    build.proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(1)"])
    phase = next(p for p in lease.PHASES if p.name == "correct-cuda")
    le = lease.Lease(run, tmp_path / "out", 60.0, [phase], build=build)
    rec = le.run_phase(phase)
    assert phase.needs_build
    assert rec["state"] == "skipped" and rec["summary"].startswith("the build failed")
    assert "Unsupported gpu architecture" in (tmp_path / "correct-cuda.log").read_text()


def test_the_cli_refuses_bad_flags_in_one_line_and_leaves_out_as_it_was(tmp_path):
    (tmp_path / "status.json").write_text("an earlier lease's")
    for args, word in ((["--budget", "-5"], "--budget"), (["--phase", "nope"], "--phase"), (["--budget", "x"], "--budget")):
        proc = subprocess.run(["bash", "benchmarks/run_gpu.sh", "--dry-run", *args], cwd=ROOT, capture_output=True,
                              text=True, env=lease_env(tmp_path), timeout=120)
        assert proc.returncode == 2 and word in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr
    assert [f.name for f in tmp_path.iterdir()] == ["status.json"]
    assert (tmp_path / "status.json").read_text() == "an earlier lease's"


# -- the correctness phase's checks ------------------------------------------------------

def _tiny(name):
    return next(c for c in gpu_correct.CASES if c.name == name).tiny()


@pytest.mark.parametrize("name", ["odd-dims-fp16", "headline-fp32"])
def test_the_correctness_check_fails_a_wrong_or_unwritten_result(monkeypatch, name):
    c = replace(_tiny(name), dtype="float32")
    assert gpu_correct.run_case(c, "torch", torch.device("cpu"))["state"] == "ok"

    def wrong(scale, nan):
        def fn(**kw):
            from proper_kernels import reference

            y, routing = reference.proper_linear(**kw)
            y = y * scale
            if nan:
                y = y.clone()
                y.view(-1)[-1] = float("nan")
            return y, routing
        return fn

    for scale, nan in ((1.01, False), (1.0, True)):
        monkeypatch.setattr(gpu_correct, "backend_fn", lambda backend, case, s=scale, n=nan: wrong(s, n))
        got = gpu_correct.run_case(c, "triton", torch.device("cpu"))
        assert got["state"] == "fail" and "y" in got["failing"], (scale, nan, got)


def test_a_case_past_its_timeout_is_recorded_and_the_rest_still_run(tmp_path):
    rows = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_correct", "--backend", "triton", "--dry-run",
                           "--workers", "1", "--case-timeout", "0.3", "--only", "T1-bf16", "E1-bf16",
                           "--rows", str(rows)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    got = read_rows(rows)
    assert proc.returncode == 1 and [r["case"] for r in got] == ["T1-bf16", "E1-bf16"]
    assert all(r["state"] == "timeout" for r in got), got
    assert proc.stdout.strip().splitlines()[-1].startswith("summary: triton: 0/2")


def test_rows_are_appended_as_they_come_and_a_cut_line_is_dropped(tmp_path):
    sink = RowSink(tmp_path / "r.jsonl", phase="p")
    sink.write({"a": 1, "x": float("nan")})
    assert read_rows(tmp_path / "r.jsonl") == [{"a": 1, "x": "nan", "phase": "p"}]
    with (tmp_path / "r.jsonl").open("a") as f:
        f.write('{"b": ')  # a kill mid-line
    assert len(read_rows(tmp_path / "r.jsonl")) == 1


def test_the_lease_compiles_about_150_triton_kernels_or_fewer():
    """The lease's budget assumes it (benchmarks/README.md: the lease plan). Counted as the
    JIT specializes, which needs the compiled kernels: without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_correct", "--backend", "triton", "--list"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0 and last.startswith("Triton kernel specializations on sm_90: "), proc.stderr[-2000:]
    n = int(last.rsplit(" ", 1)[1])
    assert 50 <= n <= 150, n


def test_the_cache_report_counts_the_installed_kernels_read_as_hits(tmp_path, monkeypatch):
    carried, cache = tmp_path / "carried", tmp_path / "cache"
    monkeypatch.setattr(lease, "CARRIED_CACHE", carried)
    monkeypatch.setattr(lease, "LEASE_CACHE", cache)
    monkeypatch.setattr(lease, "ROOT", tmp_path)

    def entry(root, name):
        d = root / name
        d.mkdir(parents=True)
        (d / "k.json").write_text("{}")
        (d / "k.cubin").write_bytes(b"\0")
        (d / "__grp__k.json").write_text(json.dumps({"child_paths": {n: str(d / n) for n in ("k.json", "k.cubin")}}))
        return d

    for name in ("A", "B", "C"):
        entry(carried, name)
        entry(cache, name)
    lease._age(cache)
    installed = sorted(p.name for p in cache.iterdir())
    (cache / "B" / "k.json").read_text()  # the runtime's hit
    entry(cache, "D")  # compiled during the lease
    got = lease.cache_report(installed)
    assert got["carried"] == 3 and got["installed"] == 3 and got["kernels_now"] == 4 and got["compiled_in_lease"] == 1
    if os.stat(cache / "B" / "k.json").st_atime <= 1:
        pytest.skip("this file system does not record access times (noatime)")
    assert got["hits"] == 1


def test_a_tool_that_refuses_the_machine_is_skipped_not_failed(tmp_path):
    run = lease.Run(dry_run=False, work=tmp_path, cores=2)
    said = "========= Error: Device not supported\nsummary: nothing ran"
    phase = lease.Phase("memcheck-small", "a stand-in", lambda r: [sys.executable, "-c", f"print({said!r}); exit(3)"],
                        30, 30, refused=lease.SANITIZER_REFUSED)
    rec = lease.Lease(run, tmp_path / "out", 60.0, [phase]).run_phase(phase)
    assert rec["state"] == "skipped" and "Device not supported" in rec["summary"], rec
    phase = replace(phase, argv=lambda r: [sys.executable, "-c", "print('summary: 2 errors'); exit(3)"])
    rec = lease.Lease(run, tmp_path / "out", 60.0, [phase]).run_phase(phase)
    assert rec["state"] == "fail" and rec["summary"] == "2 errors (exit status 3)", rec


def test_a_benchmark_phase_s_own_json_lands_in_results(tmp_path):
    run = lease.Run(dry_run=False, work=tmp_path / "work", cores=2)
    run.work.mkdir()
    code = ("import json, pathlib, sys; p = pathlib.Path(sys.argv[1]); p.parent.mkdir(parents=True); "
            "p.write_text(json.dumps({'rows': [{'median_ms': 1.5}]})); print('summary: 1 row')")
    phase = lease.Phase("bench-op", "a stand-in", lambda r: [sys.executable, "-c", code, str(r.work / "bench-op/op.json")],
                        30, 30, embeds=True)
    le = lease.Lease(run, tmp_path / "out", 60.0, [phase])
    le.records.append(le.run_phase(phase))
    le.write()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["files"] == {"bench-op/op.json": {"rows": [{"median_ms": 1.5}]}}
    assert json.loads((tmp_path / "out" / "status.json").read_text())["phases"][0]["summary"] == "1 row"
