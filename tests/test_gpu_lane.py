"""The GPU lane (benchmarks/gpu_lane.py) on the CPU: its spill check looks at every module that
holds a Triton kernel (a new strategy file must not fall out of the lane unnoticed), its dry
run writes a row per check, and its host-sync guard is not vacuous: a step that reads a
value on the host inside the guarded region is reported."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from benchmarks import gpu_lane
from benchmarks.gpu_lane import triton_modules
from benchmarks.rows import read_rows
from proper_kernels import launch

ROOT = Path(__file__).resolve().parents[1]
interpreter = pytest.mark.skipif(not launch.interpreting(), reason="the dry run needs TRITON_INTERPRET=1")


def test_the_spill_check_covers_every_module_with_a_triton_kernel():
    with_kernels = {p.stem for p in (ROOT / "proper_kernels").glob("*.py")
                    if re.search(r"^@triton\.jit", p.read_text(), re.M)}
    assert {"triton_dense", "triton_grouped", "triton_router"} <= with_kernels
    covered = {m.__name__.rpartition(".")[2] for m in triton_modules()}
    assert with_kernels <= covered, with_kernels - covered


@interpreter
def test_the_dry_run_writes_a_row_per_check_and_a_summary(tmp_path, capsys):
    rows_file = tmp_path / "lane.rows.jsonl"
    assert gpu_lane.main(["--dry-run", "--rows", str(rows_file)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "summary: dry run: host_sync ok, cuda_graph skipped, spills skipped"
    rows = {r["name"]: r for r in read_rows(rows_file)}
    assert list(rows) == ["host_sync", "cuda_graph", "spills"]
    assert all(r["phase"] == "lane" and set(r) >= {"name", "ok", "detail"} for r in rows.values())
    assert rows["host_sync"]["ok"] is True
    # the step ran the Triton kernels, forward and backward
    assert {"_shrink", "_expand", "_bwd_dh", "_bwd_dx"} <= set(re.findall(r"_\w+", rows["host_sync"]["detail"]))
    for name in ("cuda_graph", "spills"):
        assert rows[name]["ok"] is None and "GPU" in rows[name]["skipped"]


@interpreter
def test_goal_cases_are_skipped_in_a_dry_run(tmp_path):
    rows_file = tmp_path / "lane.rows.jsonl"
    assert gpu_lane.main(["--dry-run", "--goal-cases", "--rows", str(rows_file)]) == 0
    rows = read_rows(rows_file)
    assert rows[0]["name"] == "goal_cases" and rows[0]["ok"] is None and rows[0]["skipped"]


class ReadsOnTheHost(nn.Module):
    """The patched model, then a value read on the host: a sync on a GPU."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        y = self.inner(x)
        if y.abs().max() > 1e9:  # bool() of a tensor
            y = y * 0
        return y


class CallsItem(ReadsOnTheHost):
    def forward(self, x):
        y = self.inner(x)
        return y * (1 + 0 * y.mean().item())


@interpreter
@pytest.mark.parametrize("wrapper", [ReadsOnTheHost, CallsItem])
def test_a_host_read_in_the_step_is_reported(wrapper):
    spec = gpu_lane.DRY_LAYER
    model = gpu_lane.patched_layer("cpu", spec)
    x, users = gpu_lane.lane_inputs("cpu", spec)
    gpu_lane.step(model, x, users)  # warm-up, outside the guard (the interpreter reads on the host there)
    problem, _ = gpu_lane.host_sync_problem(model, x, users, spec.users)
    assert problem is None
    problem, _ = gpu_lane.host_sync_problem(wrapper(model), x, users, spec.users)
    assert problem is not None and "host sync" in problem, problem


@interpreter
def test_a_failed_check_fails_the_lane(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_lane, "host_sync_problem", lambda *a: ("a host sync in the training step: test", ""))
    rows_file = tmp_path / "lane.rows.jsonl"
    assert gpu_lane.main(["--dry-run", "--rows", str(rows_file)]) == 1
    assert read_rows(rows_file)[0] == dict(name="host_sync", ok=False, detail="a host sync in the training step: test",
                                           phase="lane")
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("summary: dry run: host_sync FAILED")


def test_without_a_gpu_or_the_interpreter_it_says_why(monkeypatch, capsys):
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    assert gpu_lane.main(["--dry-run"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().out.strip().splitlines()[-1]
    if not torch.cuda.is_available():
        assert gpu_lane.main([]) == 2
        assert capsys.readouterr().out.strip().splitlines()[-1].startswith("summary: not run: no CUDA GPU")
