"""The `proper` command line end to end on a tiny model saved to disk and a JSONL file."""

import json
import subprocess
import sys

import pytest
from proper.cli import main
from proper.demo import DemoConfig, run, tiny_llama, word_tokenizer
from proper.synthetic import make_task


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    task = make_task(num_users=12, seed=3)
    data = root / "data.jsonl"
    task.write_jsonl(data)
    model_dir = root / "model"
    tok = word_tokenizer(task.vocabulary())
    tiny_llama(len(tok), 32, 1, seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return root, data, model_dir, task


def test_train_eval_generate_export(workspace, capsys):
    root, data, model_dir, task = workspace
    out = root / "run"
    common = ["--model", str(model_dir), "--out", str(out), "--max-length", "16"]
    small = ["--steps", "4", "--save-every", "2", "--experts", "2", "--rank", "2", "--user-rank", "2",
             "--lr", "1e-2", "--batch-size", "4"]
    assert main(["train", *common, "--data", str(data), *small]) == 0
    for s in (1, 2, 3):
        assert (out / f"stage{s}" / "final" / "adapter_model.safetensors").is_file()
    assert main(["train", *common, "--data", str(data), *small]) == 0  # finished stages: nothing to do
    capsys.readouterr()
    assert main(["eval", *common, "--data", str(data), "--kind", "classification", "--max-new-tokens", "3"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert "all" in table and 0.0 <= table["all"]["accuracy"] <= 1.0
    user = task.examples[0].user_id
    assert main(["generate", *common, "--user", user, "--prompt", "opinion on apples", "--max-new-tokens", "2"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["user"] == user and isinstance(said["output"], str)
    # stage 3 has a LoRA-aware router: its gates depend on the token, so export must refuse
    with pytest.raises(ValueError, match="depend on the token"):
        main(["export", *common, "--user", user, "--dest", str(root / "peft")])
    assert main(["export", *common, "--user", user, "--stage", "2", "--dest", str(root / "peft")]) == 0
    assert (root / "peft" / "adapter_config.json").is_file()


def test_demo_runs_small(tmp_path):
    cfg = DemoConfig(num_users=16, pretrain_steps=20, batch_size=8, progress=False,
                     steps={1: 3, 2: 3, 3: 3, "oppu": 3, "moe": 3})
    lines = []
    result = run(tmp_path, cfg, log=lines.append)
    assert set(result["results"]) == {"base", "stage 1", "per-user LoRA", "MoE-LoRA (token router)",
                                      "PROPER stage 2", "PROPER stage 3"}
    assert any(line.startswith("| PROPER stage 3 |") for line in "\n".join(lines).splitlines())
    assert -1.0 <= result["ari"] <= 1.0


def test_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "proper.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "export" in out.stdout
