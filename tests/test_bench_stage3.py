"""The stage-3 speed benchmark runs and writes its JSON (no speed is asserted here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_stage3_smoke(tmp_path):
    out = tmp_path / "s3.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_stage3", "--users", "24", "--steps-per-user", "2",
                        "--batch", "8", "--peft-sample", "3", "--repeats", "1", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["schema"] == "proper.bench_stage3/1" and data["device"].startswith("cpu")
    assert data["proper_mixed_s"] > 0 and data["peft_one_at_a_time_s"] > 0 and data["peft_measured_users"] == 3
    assert out.with_suffix(".md").read_text().startswith("| stage-3 training")
