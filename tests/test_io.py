"""save_adapters / load_adapters on a tiny Llama with experts, the user bank and all routers:
exact round trips, atomic writes, and every kind of bad file refused with the model untouched."""

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import proper
import proper.io
from _helpers.models import (
    BATCH_IDS,
    GPT2,
    LLAMA,
    assert_state_equal,
    full_config,
    make_batch,
    output_of,
    randomize_adapters,
    state_copy,
)

WEIGHTS, CONFIG = "adapter_model.safetensors", "proper_config.json"


def trained_model(seed=123, **over):
    """A patched tiny Llama whose adapters are random (so they change the output)."""
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets, **over)).eval()
    randomize_adapters(model, seed=seed)
    return model


def outputs(model, ids=BATCH_IDS):
    with torch.no_grad(), proper.user_context(model, ids):
        return output_of(model, make_batch())


def adapters_of(model):
    return {k: v.detach().clone() for k, v in proper.io.adapter_state_dict(model).items()}


def read_file(path):
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def rewrite(path, edit):
    """Rewrite the weights file through safetensors with a correct checksum, after `edit`
    changed the tensors (a dict, in place) — a well-formed file with bad contents."""
    metadata, tensors = read_file(path)
    edit(tensors)
    metadata = {**metadata, "sha256": proper.io._digest(tensors, metadata["config"])}
    save_file(tensors, str(path / WEIGHTS), metadata=metadata)


@pytest.fixture
def saved(tmp_path):
    """(model, directory) with that model's random adapters saved."""
    model = trained_model()
    proper.save_adapters(model, tmp_path / "ad")
    return model, tmp_path / "ad"


# -- 1. round trips are exact ---------------------------------------------------------------


def test_load_into_a_fresh_base_model_reproduces_the_outputs_exactly(saved):
    model, path = saved
    expect = outputs(model)
    fresh = LLAMA.build()
    with torch.no_grad():
        base = output_of(fresh.eval(), make_batch())
    assert not torch.allclose(expect, base, atol=1e-3), "the random adapters must change the output"
    assert proper.load_adapters(fresh, path) is fresh
    assert proper.is_patched(fresh)
    assert proper.get_config(fresh) == proper.get_config(model)
    assert set(proper.proper_layers(fresh)) == set(proper.proper_layers(model))
    assert (outputs(fresh) - expect).abs().max().item() == 0
    mixed = [-1, 3, 5, 0]
    assert (outputs(fresh, mixed) - outputs(model, mixed)).abs().max().item() == 0


def test_load_into_an_already_patched_model(saved):
    model, path = saved
    target = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets)).eval()
    layers = proper.proper_layers(target)
    assert not torch.equal(outputs(target), outputs(model))
    proper.load_adapters(target, path)
    assert proper.proper_layers(target) == layers  # loaded in place, not re-patched
    assert (outputs(target) - outputs(model)).abs().max().item() == 0
    got, want = adapters_of(target), adapters_of(model)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_round_trip_keeps_a_regex_target(tmp_path):
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets), target_modules=r".*\.1\.mlp\.(up|down)_proj")
    randomize_adapters(model)
    proper.save_adapters(model, tmp_path)
    fresh = proper.load_adapters(LLAMA.build(), tmp_path)
    assert set(proper.proper_layers(fresh)) == {"model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}
    assert torch.equal(outputs(fresh), outputs(model))


def test_directory_layout(saved):
    model, path = saved
    assert sorted(os.listdir(path)) == [WEIGHTS, CONFIG]  # no leftover temporary files
    config = proper.ProperConfig.from_json((path / CONFIG).read_text())
    assert config == proper.get_config(model) == proper.load_config(path)
    metadata, tensors = read_file(path)
    assert metadata["format"] == proper.io.FORMAT
    assert proper.ProperConfig.from_json(metadata["config"]) == config
    assert set(tensors) == set(proper.io.adapter_state_dict(model))
    assert "model.layers.0.mlp.gate_proj.lora_A" in tensors


def test_saved_files_get_the_usual_permissions(saved):
    _, path = saved
    probe = path / "probe"
    probe.write_bytes(b"")  # what any file written here gets under the current umask
    usual = os.stat(probe).st_mode & 0o777
    probe.unlink()
    assert {f: oct(os.stat(path / f).st_mode & 0o777) for f in (WEIGHTS, CONFIG)} == {
        WEIGHTS: oct(usual), CONFIG: oct(usual)}


# -- 3. bad files are refused and the model is left as it was -------------------------------


def truncate(path):
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])


def flip_data_byte(path):
    data = bytearray((path / WEIGHTS).read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    start = 8 + header_len
    data[start + (len(data) - start) // 2] ^= 0x01  # one bit, in the middle of the tensor data
    (path / WEIGHTS).write_bytes(bytes(data))


def garbage(path):
    (path / WEIGHTS).write_bytes(b"\x07not a safetensors file\x00" * 40)


def empty(path):
    (path / WEIGHTS).write_bytes(b"")


def remove_file(path):
    (path / WEIGHTS).unlink()


def remove_dir(path):
    for f in path.iterdir():
        f.unlink()
    path.rmdir()


def wrong_format(path):
    metadata, tensors = read_file(path)
    save_file(tensors, str(path / WEIGHTS), metadata={**metadata, "format": "peft"})


def edit_config(path, field, value, checksum=True):
    metadata, tensors = read_file(path)
    config = json.loads(metadata["config"])
    config[field] = value
    metadata = {**metadata, "config": json.dumps(config)}
    if checksum:
        metadata["sha256"] = proper.io._digest(tensors, metadata["config"])
    save_file(tensors, str(path / WEIGHTS), metadata=metadata)


def bad_config(path):  # an invalid config with a matching checksum: the config check refuses it
    edit_config(path, "num_experts", "four")


def changed_config(path):  # a valid but different config that does not match the checksum
    edit_config(path, "alpha", 3.0, checksum=False)


def put_nan(path):
    rewrite(path, lambda t: t["model.layers.1.mlp.up_proj.user_B"].view(-1).__setitem__(5, float("nan")))


def put_inf(path):
    rewrite(path, lambda t: t["model.layers.0.mlp.down_proj.router_x"].view(-1).__setitem__(0, float("-inf")))


def bad_shape(path):  # the config fits the model but one tensor does not
    def edit(t):
        name = "model.layers.0.mlp.gate_proj.lora_A"
        t[name] = t[name][:, :, :-1].contiguous()

    rewrite(path, edit)


def int_tensor(path):
    def edit(t):
        name = "model.layers.0.mlp.gate_proj.lora_B"
        t[name] = torch.zeros(t[name].shape, dtype=torch.int32)

    rewrite(path, edit)


def drop_tensor(path):
    rewrite(path, lambda t: t.pop("model.layers.1.mlp.down_proj.user_A"))


CORRUPTIONS = {
    "truncated": (truncate, "truncated or corrupt"),
    "flipped_byte": (flip_data_byte, "checksum"),
    "garbage": (garbage, "not a readable safetensors"),
    "empty": (empty, "not a readable safetensors"),
    "missing_file": (remove_file, "no adapter file"),
    "missing_dir": (remove_dir, "no adapter file"),
    "wrong_format": (wrong_format, "format"),
    "bad_config": (bad_config, "num_experts"),
    "changed_config": (changed_config, "checksum"),
    "nan": (put_nan, "up_proj.user_B contains NaN"),
    "inf": (put_inf, "router_x contains NaN or Inf"),
    "bad_shape": (bad_shape, "gate_proj.lora_A has shape"),
    "int_tensor": (int_tensor, "dtype"),
    "missing_tensor": (drop_tensor, "missing .*down_proj.user_A"),
}


def snapshot(model):
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return proper.is_patched(model), dict(model.named_modules()), state_copy(model), flags


def assert_unchanged(model, snap):
    was_patched, modules, state, flags = snap
    assert proper.is_patched(model) is was_patched
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    if not was_patched:
        assert not any(isinstance(m, proper.ProperLinear) for m in model.modules())
    after = dict(model.named_modules())
    assert set(after) == set(modules) and all(after[n] is modules[n] for n in modules)
    assert_state_equal(model, state)


@pytest.mark.parametrize("target", ["unpatched", "patched"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_bad_file_is_refused_and_the_model_is_untouched(saved, corruption, target):
    _, path = saved
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(path)
    model = LLAMA.build()
    if target == "patched":
        proper.patch_model(model, full_config(LLAMA.targets))
        randomize_adapters(model, seed=5)
    snap = snapshot(model)
    with pytest.raises(proper.AdapterFileError, match=message) as err:
        proper.load_adapters(model, path)
    assert isinstance(err.value, ValueError)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "field,over",
    [("rank", dict(rank=2, alpha=4.0)), ("num_users", dict(num_users=5)), ("user_rank", dict(user_rank=2)),
     ("num_experts", dict(num_experts=3)), ("router", dict(router=("token", "user")))],
)
def test_adapters_of_another_shape_are_refused_naming_the_field(tmp_path, field, over):
    proper.save_adapters(trained_model(**over), tmp_path)
    model = trained_model(seed=9)
    snap = snapshot(model)
    with pytest.raises(proper.AdapterFileError, match=f"{field}=") as err:
        proper.load_adapters(model, tmp_path)
    assert isinstance(err.value, ValueError)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "saved_targets,model_targets,message",
    [
        (["gate_proj", "up_proj", "down_proj"], ["gate_proj", "up_proj"], r"unexpected \[.*down_proj"),
        (["gate_proj", "up_proj"], ["gate_proj", "up_proj", "down_proj"], r"missing \[.*down_proj"),
    ],
    ids=["extra_in_file", "missing_in_file"],
)
def test_adapters_for_other_modules_are_refused_naming_the_keys(tmp_path, saved_targets, model_targets, message):
    source = proper.patch_model(LLAMA.build(), full_config(saved_targets))
    randomize_adapters(source)
    proper.save_adapters(source, tmp_path)
    model = proper.patch_model(LLAMA.build(), full_config(model_targets))
    snap = snapshot(model)
    with pytest.raises(proper.AdapterFileError, match=message):
        proper.load_adapters(model, tmp_path)
    assert_unchanged(model, snap)


def test_adapters_for_another_architecture_are_refused(saved):
    _, path = saved  # Llama targets: gate/up/down_proj, which GPT-2 does not have
    model = GPT2.build()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="gate_proj"):
        proper.load_adapters(model, path)
    assert_unchanged(model, snap)


# -- 4. save refuses NaN and keeps the previous good file -----------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_save_refuses_non_finite_adapters_and_keeps_the_good_file(saved, bad):
    model, path = saved
    good_bytes = {f: (path / f).read_bytes() for f in os.listdir(path)}
    expect = outputs(model)
    with torch.no_grad():
        proper.proper_layers(model)["model.layers.1.mlp.down_proj"].lora_B[2, 3, 1] = bad
    with pytest.raises(ValueError, match="down_proj.lora_B"):
        proper.save_adapters(model, path)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == good_bytes
    fresh = proper.load_adapters(LLAMA.build(), path)
    assert torch.equal(outputs(fresh), expect)


# -- 5. saving over a directory replaces it atomically --------------------------------------


def test_saving_twice_replaces_the_files(saved):
    first, path = saved
    second = trained_model(seed=77)
    assert not torch.equal(outputs(first), outputs(second))
    proper.save_adapters(second, path)
    assert sorted(os.listdir(path)) == [WEIGHTS, CONFIG]
    loaded = proper.load_adapters(LLAMA.build(), path)
    got, want = adapters_of(loaded), adapters_of(second)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(outputs(loaded), outputs(second))


def test_a_save_that_fails_midway_keeps_the_previous_file(saved, monkeypatch):
    model, path = saved
    good = (path / WEIGHTS).read_bytes()
    real_save = proper.io.save_file

    def crash(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # half-written, then the process "dies"
            f.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(proper.io, "save_file", crash)
    randomize_adapters(model, seed=4)
    with pytest.raises(OSError, match="disk full"):
        proper.save_adapters(model, path)
    assert sorted(os.listdir(path)) == [WEIGHTS, CONFIG]  # the temporary file is gone
    assert (path / WEIGHTS).read_bytes() == good
