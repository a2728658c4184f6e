"""Every refusal leaves everything as it was: the fault is injected, the error names the
argument or the file, and the model and the files on disk are bit-identical to before.
Durability is shown as the sequence of writes, fsyncs and renames."""

import json
import os
from pathlib import Path

import pytest
import torch
from _helpers.models import LLAMA, NUM_USERS, VOCAB, full_config

import proper
import proper_kernels
from proper import _fs, patching
from proper.io import AdapterFileError, write_adapters
from proper.train.trainer import CheckpointError, TrainConfig, latest_checkpoint, train


def snapshot(model):
    """Everything a refusal must not change: each module object, each tensor's bytes and
    requires_grad flag, and whether the model is patched."""
    return (
        [(n, id(m)) for n, m in model.named_modules()],
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        patching.is_patched(model),
    )


def same(a, b):
    mods_a, params_a, patched_a = a
    mods_b, params_b, patched_b = b
    return (mods_a == mods_b and patched_a == patched_b and params_a.keys() == params_b.keys()
            and all(torch.equal(params_a[k][0], params_b[k][0]) and params_a[k][1] == params_b[k][1]
                    for k in params_a))


def files(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def saved(tmp_path):
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets))
    return model, proper.save_adapters(model, tmp_path / "adapters")


# 1. a refused load into an unpatched model leaves it as it was --------------------------------


def test_load_with_an_absurd_config_allocates_nothing_and_changes_nothing(tmp_path):
    model, _ = saved(tmp_path)
    tensors = proper.io.adapter_state_dict(model)
    huge = proper.ProperConfig.from_dict({**proper.get_config(model).to_dict(), "num_users": 10 ** 15})
    write_adapters(huge, tensors, tmp_path / "huge")  # a valid checksum over an absurd config
    target = LLAMA.build()
    target.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a flag of the user's own
    before, on_disk = snapshot(target), files(tmp_path / "huge")
    with pytest.raises(AdapterFileError, match=r"huge: .* has shape \(7, 4\), but its config \(num_users=1000000000000000"):
        proper.load_adapters(target, tmp_path / "huge")
    assert same(before, snapshot(target)) and files(tmp_path / "huge") == on_disk


def test_load_whose_config_names_missing_modules_is_an_adapter_file_error(tmp_path):
    model, _ = saved(tmp_path)
    other = proper.ProperConfig.from_dict({**proper.get_config(model).to_dict(), "target_modules": ["no_such_proj"]})
    write_adapters(other, {}, tmp_path / "other")
    target = LLAMA.build()
    before = snapshot(target)
    with pytest.raises(AdapterFileError, match="its config does not fit the model.*no_such_proj"):
        proper.load_adapters(target, tmp_path / "other")
    assert same(before, snapshot(target))


def test_load_into_an_unpatched_model_still_works(tmp_path):
    model, path = saved(tmp_path)
    target = proper.load_adapters(LLAMA.build(), path)
    want = proper.io.adapter_state_dict(model)
    got = proper.io.adapter_state_dict(target)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# 2. patch_model is all or nothing ---------------------------------------------------------------


def test_patch_model_failing_on_the_third_layer_leaves_the_model_as_it_was(monkeypatch):
    model = LLAMA.build()
    model.lm_head.weight.requires_grad_(False)
    before = snapshot(model)
    real, calls = patching.ProperLinear, []

    class Flaky(real):
        def __init__(self, *args, **kw):
            calls.append(1)
            if len(calls) == 3:
                raise MemoryError("injected: out of memory on the third layer")
            super().__init__(*args, **kw)

    monkeypatch.setattr(patching, "ProperLinear", Flaky)
    with pytest.raises(MemoryError, match="third layer"):
        proper.patch_model(model, full_config(LLAMA.targets))
    assert len(calls) == 3 and same(before, snapshot(model))
    monkeypatch.setattr(patching, "ProperLinear", real)
    proper.patch_model(model, full_config(LLAMA.targets))  # and it patches cleanly afterwards
    proper.unpatch(model)
    assert same(before, snapshot(model))


def test_patch_model_failing_during_the_swap_puts_back_every_module(monkeypatch):
    model = LLAMA.build()
    before = snapshot(model)
    real, calls = type(model).get_submodule, []

    def flaky(self, name):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("injected: failure while swapping the third layer")
        return real(self, name)

    monkeypatch.setattr(type(model), "get_submodule", flaky)
    with pytest.raises(RuntimeError, match="swapping"):
        proper.patch_model(model, full_config(LLAMA.targets))
    monkeypatch.setattr(type(model), "get_submodule", real)
    assert same(before, snapshot(model))


# 3. an empty batch with user ids ------------------------------------------------------------------


@pytest.mark.parametrize("per_sequence", [False, True])
def test_empty_batch_with_user_ids_on_every_backend(per_sequence):
    E, r, d_in, d_out, N = 4, 3, 8, 5, 6
    g = torch.Generator().manual_seed(0)
    names = ("lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")
    shapes = ((E, r, d_in), (E, d_out, r), (E, d_in), (N + 1, E), (E, 2), (N, 2, d_in), (N, d_out, 2))
    lead = (0, 5) if per_sequence else (0,)
    ids = torch.zeros(0, dtype=torch.long)
    backends = proper_kernels.available_backends("cpu", torch.float32) or ["torch"]
    for backend in set(backends) | {"torch"}:
        w = {n: torch.randn(*s, generator=g).requires_grad_(True) for n, s in zip(names, shapes)}
        x = torch.randn(*lead, d_in).requires_grad_(True)
        y = proper_kernels.proper_linear(x, torch.zeros(*lead, d_out), w["lora_A"], w["lora_B"], 2.0, top_k=2,
                                         router_x=w["router_x"], router_user=w["router_user"],
                                         router_h=w["router_h"], user_ids=ids, user_A=w["user_A"],
                                         user_B=w["user_B"], user_scaling=1.0, backend=backend)
        assert y.shape == (*lead, d_out), backend
        y.sum().backward()
        assert x.grad.shape == x.shape
        for n, p in w.items():
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, (backend, n)


# 4. user ids that cannot hold -1 ----------------------------------------------------------------


def test_unsigned_user_ids_are_refused_with_a_clear_message():
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets))
    with pytest.raises(TypeError, match="signed integer.*uint8 cannot hold -1"):
        with proper.user_context(model, torch.tensor([0, 1], dtype=torch.uint8)):
            pass
    with proper.user_context(model, torch.tensor([0, -1], dtype=torch.int8)) as ids:  # cast first
        assert ids.dtype == torch.long and ids.tolist() == [0, -1]
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="uint8 cannot hold -1"):
        proper_kernels.proper_linear(x, torch.zeros(2, 5), torch.zeros(2, 2, 8), torch.zeros(2, 5, 2), 1.0, top_k=1,
                                     router_user=torch.zeros(4, 2), user_ids=torch.tensor([0, 1], dtype=torch.uint8))
    with pytest.raises(TypeError, match="integer tensor, got dtype torch.bool"):
        with proper.user_context(model, torch.tensor([True, False])):
            pass


# 8. scalars --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,pattern", [
    (dict(scaling="2"), "scaling must be a finite real number, got '2'"),
    (dict(scaling=float("nan")), "scaling must be a finite real number, got nan"),
    (dict(scaling=True), "scaling must be a finite real number, got True"),
    (dict(user_scaling=float("inf")), "user_scaling must be a finite real number"),
    (dict(temperature=True), "temperature must be a positive finite number, got True"),
    (dict(dropout="0.1"), "dropout must be a number in"),
])
def test_scalars_are_validated(kw, pattern):
    args = dict(scaling=1.0, top_k=1)
    args.update(kw)
    scaling = args.pop("scaling")
    with pytest.raises(ValueError, match=pattern):
        proper_kernels.proper_linear(torch.randn(3, 8), torch.zeros(3, 5), torch.zeros(2, 2, 8),
                                     torch.zeros(2, 5, 2), scaling, **args)


# 5, 7, 9. training state: checksums, durability, the latest pointer ---------------------------


def batch_at(step):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (4, 9), generator=g)
    return {"input_ids": ids, "labels": ids, "user_rows": torch.randint(-1, NUM_USERS, (4,), generator=g)}


def fresh():
    return proper.patch_model(LLAMA.build(), full_config(LLAMA.targets))


CFG = TrainConfig(steps=8, lr=1e-2, save_every=4, progress=False)


def flip_bit(path: Path, offset_from_end: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("victim", ["trainer.safetensors", "trainer.json", "adapters/adapter_model.safetensors"])
def test_a_corrupt_checkpoint_is_refused_naming_the_intact_one(tmp_path, victim):
    torch.manual_seed(0)
    train(fresh(), batch_at, CFG, tmp_path)
    assert latest_checkpoint(tmp_path).name == "step-0000008"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000004", "step-0000008"]  # the previous kept
    target = tmp_path / "step-0000008" / victim
    if victim == "trainer.json":
        body = json.loads(target.read_text())
        body["losses"][0] += 1e-3  # one number changed, still valid JSON
        target.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    else:
        flip_bit(target)
    on_disk = files(tmp_path)
    model = fresh()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"corrupt checkpoint.*step-0000008.*step-0000004 is intact"):
        train(model, batch_at, CFG, tmp_path)
    assert same(before, snapshot(model)) and files(tmp_path) == on_disk


def test_resume_from_the_earlier_checkpoint_once_pointed_at_it(tmp_path):
    torch.manual_seed(0)
    losses = train(fresh(), batch_at, CFG, tmp_path)
    flip_bit(tmp_path / "step-0000008" / "trainer.safetensors")
    (tmp_path / "latest").write_text(json.dumps({"checkpoint": "step-0000004"}))
    assert train(fresh(), batch_at, CFG, tmp_path) == losses


@pytest.mark.parametrize("name", ["../elsewhere", "/etc", "step-0000004/../../x", "adapters", 7])
def test_the_latest_pointer_is_confined_to_the_checkpoint_folder(tmp_path, name):
    torch.manual_seed(0)
    train(fresh(), batch_at, CFG, tmp_path / "ckpt")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "ckpt" / "latest").write_text(json.dumps({"checkpoint": name}))
    with pytest.raises(CheckpointError, match="latest names .* which is not a checkpoint of"):
        train(fresh(), batch_at, CFG, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "latest").write_text("{not json")
    with pytest.raises(CheckpointError, match="latest is not a checkpoint pointer"):
        latest_checkpoint(tmp_path / "ckpt")


def record_io(monkeypatch):
    """Log the fsyncs (by path), renames and directory fsyncs of the code under test."""
    events, paths = [], {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def o(path, flags, *a, **kw):
        fd = real_open(path, flags, *a, **kw)
        paths[fd] = str(path)
        return fd

    def fsync(fd):
        real_fsync(fd)
        events.append(("fsync", paths.get(fd) or os.readlink(f"/proc/self/fd/{fd}")))

    def replace(a, b):
        real_replace(a, b)
        events.append(("rename", str(a), str(b)))

    monkeypatch.setattr(os, "open", o)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_atomic_write_is_write_fsync_rename_fsync_dir(tmp_path, monkeypatch):
    events = record_io(monkeypatch)
    _fs.atomic_write_text(tmp_path / "f.json", "{}")
    (tmp_kind, tmp_file), (rename, src, dst), (dir_kind, directory) = events
    assert tmp_kind == "fsync" and Path(tmp_file).name.startswith(".f.json.") and tmp_file.endswith(".tmp")
    assert (rename, src, dst) == ("rename", tmp_file, str(tmp_path / "f.json"))
    assert (dir_kind, directory) == ("fsync", str(tmp_path))
    assert (tmp_path / "f.json").read_text() == "{}"


def test_a_checkpoint_is_on_disk_before_latest_points_at_it(tmp_path, monkeypatch):
    model = fresh()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    events = record_io(monkeypatch)
    proper.train.trainer.save_checkpoint(tmp_path, model, opt, 4, [1.0])
    tmp, final = str(tmp_path / ".step-0000004.tmp"), str(tmp_path / "step-0000004")
    moved = events.index(("rename", tmp, final))
    synced = [e[1] for e in events[:moved] if e[0] == "fsync"]
    for f in ("trainer.safetensors", "trainer.json", "adapters/adapter_model.safetensors", "adapters/proper_config.json"):
        assert f"{tmp}/{f}" in synced, f  # every file of the checkpoint, before the rename
    assert synced[-1] == tmp  # then its directory
    after = events[moved + 1:]
    assert after[0] == ("fsync", str(tmp_path))  # the rename itself, durable
    pointer = next(i for i, e in enumerate(after) if e[0] == "rename" and e[2] == str(tmp_path / "latest"))
    assert after[pointer - 1][0] == "fsync" and after[pointer - 1][1] == after[pointer][1]  # latest's temp
    assert after[pointer + 1] == ("fsync", str(tmp_path))


# 6. temp files of killed saves -------------------------------------------------------------------


def test_stale_temp_files_are_removed_at_the_next_save(tmp_path):
    model, path = saved(tmp_path)
    host = _fs._host()
    dead = tmp_path / "adapters" / f".adapter_model.safetensors.{host}-999999999.abcd.tmp"  # no such process
    old = tmp_path / "adapters" / ".adapter_model.safetensors.k2j3h4.tmp"  # the old naming, a day old
    live = tmp_path / "adapters" / f".adapter_model.safetensors.{host}-{os.getpid()}.live.tmp"  # a save in progress
    young = tmp_path / "adapters" / ".config.json.zz.tmp"  # the old naming, fresh: maybe in progress
    mine = tmp_path / "adapters" / "notes.tmp"  # not ours
    for f in (dead, old, live, young, mine):
        f.write_bytes(b"x" * 1000)
    os.utime(old, (0, 0))
    proper.save_adapters(model, path)
    left = {p.name for p in (tmp_path / "adapters").iterdir()}
    assert dead.name not in left and old.name not in left
    assert {live.name, young.name, mine.name} <= left
    assert not any(n.endswith(".tmp") and n not in (live.name, young.name, mine.name) for n in left)


def test_killed_checkpoint_directories_are_removed_at_the_next_save(tmp_path):
    (tmp_path / ".step-0000002.tmp" / "adapters").mkdir(parents=True)
    (tmp_path / ".step-0000002.tmp" / "trainer.safetensors").write_bytes(b"x" * 1000)
    model = fresh()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    proper.train.trainer.save_checkpoint(tmp_path, model, opt, 4, [1.0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000004"]
