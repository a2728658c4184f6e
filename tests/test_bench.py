"""`proper bench --device cpu --quick`: the JSON schema, every baseline row, the table and
the plots. Timings themselves are not asserted (speed goals live in the committed results)."""

import json
import subprocess
import sys

import pytest
import torch

from proper.apps import bench
from proper.apps.cli import main as cli_main

OP_VARIANTS = {"linear", "proper", "proper-compile", "peft-moe"}
BLOCK_VARIANTS = {"base", "peft-shared", "peft-mixed", "proper"}
MODEL_VARIANTS = BLOCK_VARIANTS | {"proper-compile"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # a process of its own, as `proper bench` runs (torch.compile's C++ toolchain set-up is
    # sensitive to what the test process imported before)
    run = subprocess.run([sys.executable, "-c", "import sys; from proper.apps.cli import main; sys.exit(main())", "bench",
                          "--device", "cpu", "--quick", "--repeats", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(out.iterdir())
    (js,) = [f for f in files if f.suffix == ".json"]
    return json.loads(js.read_text()), out


def test_json_schema(result):
    res, _ = result
    assert res["schema"] == bench.SCHEMA
    assert set(res) == set(bench.HEADER_FIELDS), set(res) ^ set(bench.HEADER_FIELDS)
    assert res["command"].startswith("proper bench") and res["seconds"] > 0
    assert res["device"]["type"] == "cpu" and res["device"]["name"]
    for key in ("torch", "transformers", "peft", "proper", "python"):
        assert res["versions"][key]
    assert res["peaks"]["matmul_tflops"] > 0 and res["peaks"]["copy_gbps"] > 0
    assert res["settings"]["rounds"] == 2 and res["settings"]["quick"] is True
    assert res["rows"]
    for row in res["rows"]:
        assert set(row) == set(bench.ROW_FIELDS), set(row) ^ set(bench.ROW_FIELDS)
        assert row["ok"] is True and row["error"] is None, row["case"]
        assert row["kind"] == bench.KINDS[row["variant"]]
        assert row["device"] == "cpu" and row["dtype"] == "fp32"
        assert row["mode"] in ("forward", "train step", "generate")
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"] and row["reps"] >= 2
        assert len(row["times_ms"]) == row["reps"] and row["tokens_per_s"] > 0
        assert row["peak_mib"] is None  # not measured on the CPU
        if row["level"] == "op":
            assert row["tflops"] > 0 and row["gbps"] > 0 and row["shape"]["tokens"] > 0
            assert row["bytes"] > 0 and row["pct_of_copy"] > 0 and row["input_sets"] >= 1
            assert row["ratio_to_floor"] > 0 and row["speedup_vs_peft"] > 0


def test_every_baseline_row_is_present(result):
    res, _ = result
    cases: dict = {}
    for row in res["rows"]:
        cases.setdefault((row["level"], row["case"]), set()).add(row["variant"])
    levels = {level for level, _ in cases}
    assert levels == {"op", "block", "model"}
    modes = {}
    for row in res["rows"]:
        modes.setdefault((row["level"], row["case"]), row["sweep"])
    for (level, case), variants in cases.items():
        sweep = modes[(level, case)]
        want = {"op": OP_VARIANTS, "block": BLOCK_VARIANTS, "model": MODEL_VARIANTS}[level]
        if level == "model" and sweep == "train":
            want = {"lora", "proper", "peft-moe"}
        if level == "model" and sweep == "generate":
            want = {"proper", "peft-mixed"}
        assert variants == want, (level, case, variants)
    assert {r["sweep"] for r in res["rows"] if r["level"] == "model"} == {"forward", "train", "generate"}
    sweeps = {row["sweep"] for row in res["rows"] if row["level"] == "op"}
    assert sweeps == {"tokens", "users", "experts"}
    s = res["summary"]
    assert set(s["adapter_overhead_ms"]) == MODEL_VARIANTS - {"base", "proper-compile"}
    assert "64 users x 32 tokens" in s["model"] and "r=8" in s["model"]
    assert s["train_proper_over_lora"] > 0 and s["train_peft_moe_over_proper"] > 0
    assert set(s["generate_tokens_per_s"]) == {"proper", "peft-mixed"}


def test_table_and_plots(result):
    res, out = result
    md = (out / f"cpu-{res['date']}.md").read_text()
    assert "Personalization overhead" in md and "| peft-mixed |" in md
    assert md.count("\n| op |") == sum(r["level"] == "op" for r in res["rows"])
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 2
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stem = f"cpu-{res['date']}"
    assert {p.name for p in out.iterdir()} == {f"{stem}.json", f"{stem}.md"} | {
        f"{stem}-{sweep}.png" for sweep in ("tokens", "users", "experts")}


def test_paired_overhead_pairs_rounds():
    t = bench._quantiles([10.0, 20.0, 12.0])
    base = bench._quantiles([9.0, 19.0, 11.0])
    d = bench.paired_overhead(t, base)
    assert d.median_ms == pytest.approx(1.0) and d.p20_ms == pytest.approx(1.0)


def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli_main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_an_overhead_whose_spread_crosses_zero_is_not_resolved():
    from proper.apps.bench import Timing, describe_overhead, paired_overhead, resolved_at_noise

    base = Timing(10.0, 9.0, 11.0, 5, [10.0, 9.0, 11.0, 10.5, 9.5])
    noisy = paired_overhead(Timing(10.2, 8.0, 12.0, 5, [8.0, 12.0, 10.2, 9.0, 11.0]), base)
    clear = paired_overhead(Timing(30.0, 29.0, 31.0, 5, [30.0, 29.0, 31.0, 30.5, 29.5]), base)
    assert not resolved_at_noise(noisy) and "not resolved at this noise" in describe_overhead(noisy)
    assert resolved_at_noise(clear) and describe_overhead(clear) == "20.0 ms"
