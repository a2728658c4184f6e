"""The `proper` command line end to end on a tiny model saved to disk and a JSONL file."""

import json
import subprocess
import sys

import pytest
import proper
import torch
from proper.apps.cli import main
from proper.apps.demo import DemoConfig, run, tiny_llama, word_tokenizer
from proper.train.synthetic import make_task


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

    from proper.apps.commands import _model_loader
    from proper.train.data import UserIndex
    from proper.patching import user_context
    from proper.train.stages import load_stage

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
    out = subprocess.run([sys.executable, "-m", "proper.apps.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "export" in out.stdout


def _refused_in_a_process(argv, pattern):
    """As a user runs it: a process of its own, exit status 2, one line naming `pattern`, no traceback."""
    out = subprocess.run([sys.executable, "-m", "proper.apps.cli", *map(str, argv)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and out.stderr.startswith("proper: error: "), (argv, out.returncode, out.stderr)
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr and pattern in out.stderr, out.stderr


def _refused(capsys, argv):
    """main(argv) refuses: exit status 2 and one line `proper: error: ...` on stderr."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (argv, rc, err)
    assert err.startswith("proper: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_every_refusal_is_one_line_before_anything_loads(workspace, capsys, tmp_path, monkeypatch):
    root, data, model_dir, task = workspace
    import proper.apps.commands as commands

    def no_load(path):
        raise AssertionError("the model must not load for a refused command")

    monkeypatch.setattr(commands, "_model_loader", no_load)
    afile = tmp_path / "a-file"
    afile.write_text("x")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user_id": "u1", "input": "x", "output": "y"}\nnot json\n')
    m, d, o = ["--model", str(model_dir)], ["--data", str(data)], ["--out", str(tmp_path / "run")]
    cases = [
        (["train", *d, *o], "the following arguments are required: --model"),
        (["train", *m, *o], "the following arguments are required: --data"),
        (["train", "--model", str(tmp_path / "nope"), *d, *o], "--model: no model directory"),
        (["train", *m, "--data", str(tmp_path / "nope.jsonl"), *o], "--data: no file at"),
        (["train", *m, *d, "--out", str(afile)], "is a file, not a run directory"),
        (["train", *m, *d, *o, "--stages", "4"], "--stages must be a comma-separated list of 1, 2, 3, got '4'"),
        (["train", *m, *d, *o, "--stages", "one"], "--stages must be"),
        (["train", *m, *d, *o, "--save-every", "0"], "--save-every must be positive, got 0"),
        (["train", *m, *d, *o, "--steps", "-5"], "--steps must be a positive integer or 3 of them (one per stage), "
                                                  "got '-5'"),
        (["train", *m, *d, *o, "--steps", "10,20"], "--steps must be a positive integer or 3 of them"),
        (["train", *m, *d, *o, "--alpha", "0"], "--alpha must be positive, got 0.0"),
        (["train", *m, *d, *o, "--lr", "nan"], "--lr must be positive"),
        (["train", *m, *d, *o, "--top-k", "5", "--experts", "2"], "--top-k must be in [1, --experts] = [1, 2]"),
        (["train", *m, *d, *o, "--steps", "ten"], "--steps must be a positive integer or one per stage"),
        (["eval", *m, *d, *o, "--stage", "7"], "--stage must be one of 1, 2, 3, got 7"),
        (["generate", *m, *o, "--user", "u1", "--prompt", "hi"], "is not a trained run (no users.json)"),
        (["export", *m, *o, "--user", "u1", "--dest", str(tmp_path / "x")], "is not a trained run"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ]
    for argv, pattern in cases:
        assert pattern in _refused(capsys, argv), (argv, pattern)
        _refused_in_a_process(argv, pattern)
    monkeypatch.undo()
    # malformed data: found when it is read, still one line naming the file and the line
    argv = ["train", *m, "--data", str(bad), "--out", str(tmp_path / "run2"), "--steps", "1"]
    err = _refused(capsys, argv)
    assert "bad.jsonl:2: " in err and "json" in err.lower(), err
    _refused_in_a_process(argv, "bad.jsonl:2: ")


def test_unknown_and_cold_start_users(workspace, capsys):
    root, data, model_dir, task = workspace
    out = root / "run"  # trained by test_train_eval_generate_export
    if not (out / "users.json").is_file():
        pytest.skip("needs the trained run of test_train_eval_generate_export")
    common = ["--model", str(model_dir), "--out", str(out), "--max-length", "16"]
    err = _refused(capsys, ["generate", *common, "--user", "nobody", "--prompt", "hi"])
    assert "--user: unknown user 'nobody'" in err and "-1 is a user without a row" in err
    # the refusals that need a trained run, each as a process of its own
    _refused_in_a_process(["generate", *common, "--user", "nobody", "--prompt", "hi"], "--user: unknown user 'nobody'")
    dest = root / "refused-export"
    _refused_in_a_process(["export", *common, "--user", "nobody", "--dest", dest], "--user: unknown user 'nobody'")
    user = task.examples[0].user_id
    _refused_in_a_process(["export", *common, "--user", user, "--stage", "3", "--dest", dest],
                          "stage 3 has no exact PEFT export")
    assert not dest.exists()
    assert main(["generate", *common, "--user", "-1", "--prompt", "opinion on apples", "--max-new-tokens", "2"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["user"] == -1 and isinstance(said["output"], str)


def test_debug_shows_the_traceback(workspace, tmp_path):
    root, data, model_dir, task = workspace
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "r"), "--steps", "0"]
    with pytest.raises(Exception, match="--steps must be a positive integer"):
        main([*argv, "--debug"])


def test_train_defaults_come_from_the_configs_and_steps_per_stage(workspace, tmp_path, capfd):
    """No default of its own: PipelineConfig's sizes and scalings, TrainConfig's rates; --steps per
    stage; a progress line per --log-every steps when the output is not a terminal."""
    import argparse

    from proper.train.stages import PipelineConfig
    from proper.train.trainer import TrainConfig

    root, data, model_dir, task = workspace
    seen = {}

    def fake_run_stage(build, sampler, out, cfg, stage, **kw):
        seen[stage] = cfg

    argv = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "r"),
            "--steps", "3,4,5"]
    import proper.train.stages

    real = proper.train.stages.run_stage
    proper.train.stages.run_stage = fake_run_stage
    try:
        assert main(argv) == 0
    finally:
        proper.train.stages.run_stage = real
    cfg = seen[3]
    want = PipelineConfig(num_users=1)
    # stated once: the pipeline's layer sizes and scalings are ProperConfig's
    layer = proper.ProperConfig()
    for f in ("num_experts", "top_k", "rank", "alpha", "user_rank", "user_alpha", "temperature", "target_modules"):
        assert getattr(want, f) == getattr(layer, f), f
    assert (want.population_rank, want.population_alpha) == (layer.rank, layer.alpha)
    stage3 = want.stage_config(3)
    assert stage3.scaling == layer.scaling and stage3.user_scaling == layer.user_scaling
    for f in ("num_experts", "top_k", "rank", "alpha", "user_rank", "user_alpha", "population_rank",
              "population_alpha", "target_modules"):
        assert getattr(cfg, f) == getattr(want, f), f
    assert [cfg.train[s].steps for s in (1, 2, 3)] == [3, 4, 5]
    assert cfg.train[1].lr == TrainConfig().lr and cfg.train[1].save_every == TrainConfig().save_every
    # a real run into a log (not a terminal): progress lines
    out = tmp_path / "logged"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-length", "16",
                 "--stages", "1", "--steps", "4", "--log-every", "2", "--experts", "2", "--rank", "2",
                 "--user-rank", "2", "--batch-size", "4"]) == 0
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if " step " in ln and "tokens/s" in ln]
    assert [ln.split(" step ")[1].split()[0] for ln in lines] == ["2/4", "4/4"], err
    assert all(" loss " in ln and " lr " in ln for ln in lines)


CHAT = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}")


def test_chat_template_formats_training_and_generation(workspace, tmp_path, capsys):
    from proper.train.data import Example, UserIndex, encode
    from proper.apps.demo import tiny_llama, word_tokenizer

    root, data, model_dir, task = workspace
    tok = word_tokenizer(task.vocabulary() + ["user", "assistant", ":", ";"])
    tok.chat_template = CHAT
    ex = Example("u1", task.examples[0].input, task.examples[0].output)
    users = UserIndex.from_examples([ex])
    (enc,) = encode([ex], tok, users, 64, chat_template=True)
    user = [{"role": "user", "content": ex.input}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert list(enc.prompt) == list(prompt)
    assert tok.decode(list(enc.target)).strip() == f"{ex.output} ;"  # the assistant turn as the template ends it
    chat_dir = tmp_path / "chat-model"
    tiny_llama(len(tok), 32, 1, seed=0).save_pretrained(chat_dir)
    tok.save_pretrained(chat_dir)
    common = ["--model", str(chat_dir), "--out", str(tmp_path / "run"), "--max-length", "32", "--chat-template"]
    assert main(["train", *common, "--data", str(data), "--stages", "1", "--steps", "2", "--save-every", "2",
                 "--rank", "2", "--population-rank", "2", "--batch-size", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", *common, "--user", task.examples[0].user_id, "--prompt", "opinion on apples",
                 "--stage", "1", "--max-new-tokens", "2"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["output"], str)
    # a tokenizer without a template: refused in one line
    err = _refused(capsys, ["train", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "r2"),
                            "--chat-template", "--steps", "1"])
    assert "--chat-template: the tokenizer of" in err and "has no chat template" in err
