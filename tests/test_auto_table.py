"""backend="auto" by its table: the default rows and their reasons, a measured table for
the GPU it was measured on, and the dispatcher's phases. All on the CPU: a "cuda" device
needs no GPU for the choice itself."""

import json

import pytest
import torch

import proper_kernels
from proper_kernels import auto_table, dispatch

GPU = torch.device("cuda")


def both_available():
    return all(dispatch._REGISTRY[n].available(GPU, torch.bfloat16) is None for n in ("cuda", "triton"))


@pytest.fixture
def table_file(tmp_path, monkeypatch):
    p = tmp_path / "auto_table.json"
    monkeypatch.setenv("PROPER_AUTO_TABLE", str(p))
    monkeypatch.setattr(auto_table, "_device_name", lambda device: "Test GPU" if device.type == "cuda" else None)
    return p


def test_every_phase_has_a_default_row_with_a_reason():
    for phase in auto_table.PHASES:
        for tokens in (1, 64, 256, 257, 8192, None):
            rows = [r for r in auto_table.DEFAULT if r.covers(phase, tokens)]
            assert rows, (phase, tokens)
            assert all(r.backend in ("cuda", "triton", "torch") and len(r.reason) > 20 for r in rows)
            assert all("no GPU measurement" in r.reason for r in rows)


def test_cpu_auto_is_torch_and_explains():
    name, why = proper_kernels.select_backend("auto", "cpu", explain=True)
    assert name == "torch" and "cpu" in why


@pytest.mark.skipif(not both_available(), reason="needs the CUDA extension and triton")
def test_default_table_on_a_gpu_device(table_file):
    assert not table_file.exists()
    assert proper_kernels.select_backend("auto", GPU, torch.bfloat16, phase="decode", tokens=64) == "cuda"
    assert proper_kernels.select_backend("auto", GPU, torch.bfloat16, phase="prefill", tokens=8192) == "triton"
    name, why = proper_kernels.select_backend("auto", GPU, torch.bfloat16, phase="train", tokens=100, explain=True)
    assert name == "triton" and why.startswith("auto, train at 100 tokens: default (no GPU measurement)")
    # float64: neither kernel backend takes it, and the reason says so.
    name, why = proper_kernels.select_backend("auto", GPU, torch.float64, phase="prefill", explain=True)
    assert name == "torch" and "passed over: triton" in why


@pytest.mark.skipif(not both_available(), reason="needs the CUDA extension and triton")
def test_a_measured_table_wins_on_its_gpu_only(table_file, monkeypatch):
    rows = [auto_table.Row("prefill", 0, None, "cuda", "measured: cuda 1.0 us, triton 2.0 us")]
    auto_table.write_measured("Test GPU", rows)
    auto_table.write_measured("Other GPU", [auto_table.Row("prefill", 0, None, "triton", "measured elsewhere")])
    data = json.loads(table_file.read_text())
    assert data["schema"] == auto_table.SCHEMA and set(data["devices"]) == {"Test GPU", "Other GPU"}
    name, why = proper_kernels.select_backend("auto", GPU, torch.bfloat16, phase="prefill", tokens=8192, explain=True)
    assert (name, why.split(": ", 1)[1]) == ("cuda", "measured: cuda 1.0 us, triton 2.0 us")
    # Phases the measurement left out keep their default row.
    assert proper_kernels.select_backend("auto", GPU, torch.bfloat16, phase="train") == "triton"
    monkeypatch.setattr(auto_table, "_device_name", lambda device: "Third GPU")
    assert proper_kernels.select_backend("auto", GPU, torch.bfloat16, phase="prefill") == "triton"


def test_a_corrupt_table_file_falls_back_to_the_default(table_file):
    table_file.write_text("{not json")
    assert auto_table.measured("Test GPU") is None
    assert [r.backend for r in auto_table.lookup(GPU, "prefill", 10)] == ["triton"]


def test_bad_phase_is_named():
    with pytest.raises(ValueError, match="phase must be one of"):
        auto_table.lookup(GPU, "inference", 3)
    with pytest.raises(ValueError, match="phase must be one of"):
        auto_table.write_measured("x", [auto_table.Row("warmup", 0, None, "cuda", "")])


def test_measure_needs_a_gpu():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        auto_table.measure("cpu")
