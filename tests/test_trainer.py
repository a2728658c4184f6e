"""The trainer resumes a killed run from its last checkpoint and ends where an
uninterrupted run ends."""

import math
from dataclasses import replace

import pytest
import torch
from _helpers.models import LLAMA, NUM_USERS, VOCAB, full_config

import proper
from proper.train.trainer import TrainConfig, latest_checkpoint, lr_factor, train


def batch_at(step):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (4, 9), generator=g)
    return {"input_ids": ids, "labels": ids, "user_rows": torch.randint(-1, NUM_USERS, (4,), generator=g)}


def fresh():
    return proper.patch_model(LLAMA.build(), full_config(LLAMA.targets, dropout=0.1))


CFG = TrainConfig(steps=12, lr=1e-2, save_every=4, progress=False)


class Killed(Exception):
    pass


def adapters(model):
    return {k: v.detach().clone() for k, v in proper.io.adapter_state_dict(model).items()}


@pytest.mark.parametrize("cfg", [CFG, replace(CFG, schedule="cosine", warmup=0.25)], ids=["constant", "cosine"])
def test_killed_run_resumes_to_the_same_adapters(tmp_path, cfg):
    CFG = cfg
    torch.manual_seed(0)
    straight = fresh()
    ref_losses = train(straight, batch_at, CFG, tmp_path / "a")

    def kill(step, loss):
        if step == 6:  # after the checkpoint of step 4, before the one of step 8
            raise Killed

    torch.manual_seed(0)
    model = fresh()
    with pytest.raises(Killed):
        train(model, batch_at, CFG, tmp_path / "b", on_step=kill)
    assert latest_checkpoint(tmp_path / "b").name == "step-0000004"
    resumed = fresh()  # a new process: the same command again
    torch.manual_seed(123)  # whatever the RNG holds, the checkpoint's state is restored
    losses = train(resumed, batch_at, CFG, tmp_path / "b")
    assert losses == ref_losses
    want, got = adapters(straight), adapters(resumed)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # A finished run resumes to nothing more.
    again = fresh()
    assert train(again, batch_at, CFG, tmp_path / "b") == ref_losses


def test_trainable_filter_freezes_the_rest(tmp_path):
    model = fresh()
    before = adapters(model)
    train(model, batch_at, TrainConfig(steps=2, lr=1e-2, progress=False), trainable=lambda n: "user_" in n)
    after = adapters(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("user_" in k for k in changed)


def test_router_lr_scale():
    model = fresh()
    before = adapters(model)
    train(model, batch_at, TrainConfig(steps=2, lr=1e-2, progress=False, router_lr_scale=0.0))
    after = adapters(model)
    routers = [k for k in before if k.rsplit(".", 1)[-1].startswith("router_")]
    assert routers and all(torch.equal(before[k], after[k]) for k in routers)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("lora_B"))


def test_cosine_schedule_with_warmup(monkeypatch):
    cfg = TrainConfig(steps=10, schedule="cosine", warmup=0.2)
    got = [lr_factor(cfg, s) for s in range(10)]
    assert got[:2] == [0.5, 1.0]  # linear warm-up over 2 steps
    assert got[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)])
    assert all(lr_factor(TrainConfig(steps=10), s) == 1.0 for s in range(10))
    # the optimizer really steps at those rates (every param group: the routers' too)
    seen = []
    step = torch.optim.AdamW.step

    def recording(self, *a, **kw):
        seen.append([g["lr"] for g in self.param_groups])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    train(fresh(), batch_at, replace(cfg, lr=1e-2, router_lr_scale=0.5, progress=False))
    assert seen == [pytest.approx([1e-2 * f, 0.5e-2 * f]) for f in got]
    for bad in (dict(schedule="linear"), dict(warmup=1.0), dict(warmup=-0.1)):
        with pytest.raises(ValueError, match="TrainConfig"):
            train(fresh(), batch_at, replace(cfg, **bad))
