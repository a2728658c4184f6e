"""The `proper` command line end to end on a tiny model saved to disk and a JSONL file."""

import json
import subprocess
import sys

import pytest
import torch
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
    # stage 3 has a LoRA-aware router: its gates depend on the token, so an exact export is
    # refused in one line that names the stage to use, and nothing is written
    assert main(["export", *common, "--user", user, "--stage", "3", "--dest", str(root / "peft3")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stage 3 has no exact PEFT export" in err and "--stage 2" in err
    assert not (root / "peft3").exists()
    assert main(["export", *common, "--user", "nobody", "--dest", str(root / "peft3")]) == 2
    assert "--user: unknown user 'nobody'" in capsys.readouterr().err


def _exported_matches_proper(root, data, model_dir, task, name, targets):
    """`proper train`, then README's export command (no --stage: the latest exact stage, 2),
    loaded by peft onto a fresh copy of the original model: proper's logits for that user."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from proper.cli import _model_loader
    from proper.data import UserIndex
    from proper.patching import user_context
    from proper.stages import load_stage

    out, dest = root / name, root / f"{name}-peft"
    common = ["--model", str(model_dir), "--out", str(out), "--max-length", "16"]
    assert main(["train", *common, "--data", str(data), "--steps", "6", "--save-every", "3", "--experts", "3",
                 "--rank", "2", "--user-rank", "2", "--lr", "5e-2", "--batch-size", "4",
                 "--target-modules", *targets]) == 0
    user = task.examples[-1].user_id
    assert main(["export", *common, "--user", user, "--format", "peft", "--dest", str(dest)]) == 0
    build, tokenizer = _model_loader(str(model_dir))
    users = UserIndex.load(out / "users.json")
    ids = tokenizer(["opinion on apples", "opinion on wine"], return_tensors="pt")["input_ids"]
    stage2 = load_stage(build, out, 2)
    with torch.no_grad(), user_context(stage2, [users.row(user)] * len(ids)):
        want = stage2(input_ids=ids).logits
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        plain = original(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(original, str(dest)).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-4 * scale
    assert (plain - want).abs().max().item() > 1e-2 * scale  # stages 1 and 2 changed the model: the check can fail


def test_stage2_export_is_exact_on_the_original_model(workspace, capsys):
    _exported_matches_proper(*workspace, "ffn", ["gate_proj", "up_proj", "down_proj"])
    assert "exporting stage 2, the latest stage with an exact PEFT export" in capsys.readouterr().err


def test_stage2_export_with_attention_targets(workspace):
    _exported_matches_proper(*workspace, "attn", ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])


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
