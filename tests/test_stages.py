"""The three stages chain on a tiny Llama: each starts from the previous one's result."""

import pytest
import torch
from _helpers.stages import batch_at, records
from _helpers.models import LLAMA, NUM_USERS

import proper
from proper.io import load_adapters, save_adapters
from proper.train.stages import (
    FORCE_LOGIT,
    PipelineConfig,
    assign_groups,
    build_stage_model,
    expert_losses,
    is_done,
    load_stage,
    recent_records,
    run_stage,
)
from proper.train.trainer import TrainConfig


@pytest.mark.parametrize("restarts", [1, 2])
def test_stages_chain_and_resume(tmp_path, restarts):
    tc = TrainConfig(steps=3, lr=1e-2, save_every=2, progress=False)
    cfg = PipelineConfig(num_users=NUM_USERS, target_modules=LLAMA.targets, num_experts=4, top_k=2, rank=4,
                         user_rank=2, train={1: tc, 2: tc, 3: tc}, group_assignments=2, group_restarts=restarts,
                         group_restart_steps=2)
    with pytest.raises(RuntimeError, match="needs stage 1 first"):
        run_stage(LLAMA.build, batch_at, tmp_path, cfg, 2, records=records(), pad_id=0)
    for stage in (1, 2, 3):
        if stage == 2:
            with pytest.raises(ValueError, match="records="):
                run_stage(LLAMA.build, batch_at, tmp_path, cfg, stage)
        assert run_stage(LLAMA.build, batch_at, tmp_path, cfg, stage, records=records(), pad_id=0)
        assert is_done(tmp_path, stage)
        assert run_stage(LLAMA.build, batch_at, tmp_path, cfg, stage) == []  # done: not trained again
        assert (tmp_path / f"stage{stage}" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / f"stage{stage}" / "routing.png").is_file() == (stage >= 2)

    s2 = load_stage(LLAMA.build, tmp_path, 2)
    s3 = load_stage(LLAMA.build, tmp_path, 3)
    assert proper.get_config(s3).router == ("user", "lora") and proper.get_config(s3).user_rank == 2
    # Stage 3 started from stage 2's experts and user-aware router, and kept them frozen.
    for (name, l2), l3 in zip(proper.proper_layers(s2).items(), proper.proper_layers(s3).values()):
        assert torch.equal(l2.lora_A, l3.lora_A) and torch.equal(l2.lora_B, l3.lora_B), name
        assert torch.equal(l2.router_user, l3.router_user)
        assert l3.user_B.abs().sum() > 0  # the user bank trained
    # Stage 1 is merged into the base of the later stages: the stage-3 starting model with a
    # zero user bank gives the stage-2 outputs.
    start = build_stage_model(LLAMA.build, tmp_path, cfg, 3).eval()
    ids = batch_at(99)["input_ids"]
    with torch.no_grad(), proper.user_context(start, [0, 1, -1, 3]), proper.user_context(s2, [0, 1, -1, 3]):
        torch.testing.assert_close(start(input_ids=ids).logits, s2(input_ids=ids).logits)


def test_stage2_shares_one_user_router_and_assigns_users_by_their_records(tmp_path):
    tc = TrainConfig(steps=2, lr=1e-2, save_every=2, progress=False)
    cfg = PipelineConfig(num_users=NUM_USERS, target_modules=LLAMA.targets, num_experts=3, top_k=2, rank=4,
                         train={1: tc, 2: tc, 3: tc}, group_assignments=0)
    run_stage(LLAMA.build, batch_at, tmp_path, cfg, 1)
    model = build_stage_model(LLAMA.build, tmp_path, cfg, 2)
    layers = list(proper.proper_layers(model).values())
    assert all(layer.router_user is layers[0].router_user for layer in layers)
    with torch.no_grad():  # experts that differ, so that the losses differ
        for layer in layers:
            layer.lora_B.normal_(0.0, 0.5)
    recs = records()
    losses = expert_losses(model, recs, pad_id=0, batch_size=3)
    assert losses.shape == (NUM_USERS, 3) and losses.dtype == torch.float64
    # Independent check of one entry: user 0's records, routed to expert 1 in every layer.
    with torch.no_grad():
        saved = layers[0].router_user.clone()
        layers[0].router_user.zero_()
        layers[0].router_user[:, 1] = FORCE_LOGIT
        total = 0.0
        for r in recs:
            if r.user_row == 0:
                ids = torch.tensor([r.prompt + r.target])
                labels = torch.tensor([[-100] * len(r.prompt) + list(r.target)])
                with proper.user_context(model, [0]):
                    total += model.eval()(input_ids=ids, labels=labels).loss.item() * len(r.target)
        layers[0].router_user.copy_(saved)
    assert losses[0, 1].item() == pytest.approx(total, rel=1e-5)
    assert torch.equal(losses[2], torch.zeros(3, dtype=torch.float64))  # no records
    assert torch.equal(layers[0].router_user, saved)  # the router is put back

    experts, total_nll = assign_groups(model, recs, pad_id=0, strength=3.0)
    seen = [0, 1, 3, 4]
    assert experts.tolist()[2] == -1 and experts.tolist()[5:] == [-1] * (NUM_USERS - 5)
    assert experts[seen].tolist() == losses[seen].argmin(-1).tolist()
    assert total_nll == pytest.approx(losses[seen].min(-1).values.sum().item())
    R = layers[0].router_user
    for u in seen:
        want = torch.zeros(3)
        want[experts[u]] = 3.0
        assert torch.equal(R[u].detach(), want)
    assert torch.equal(R[2].detach(), saved[2]) and torch.equal(R[-1].detach(), saved[-1])  # untouched rows

    # The shared router is stored once and comes back shared.
    save_adapters(model, tmp_path / "a")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "router_user" in keys and not any(k.endswith(".router_user") for k in keys)
    back = load_adapters(LLAMA.build(), tmp_path / "a")
    back_layers = list(proper.proper_layers(back).values())
    assert all(layer.router_user is back_layers[0].router_user for layer in back_layers)
    assert torch.equal(back_layers[0].router_user, R)


def test_recent_records_keeps_the_last_ones_per_user():
    recs = records((4, 1, 0, 2))
    kept = recent_records(recs, 2)
    assert [r.user_row for r in kept] == [0, 0, 1, 3, 3]
    assert kept[:2] == recs[2:4]
    with pytest.raises(ValueError, match="per_user"):
        recent_records(recs, 0)


@pytest.mark.parametrize("field,value", [("group_assignments", -1), ("group_restarts", 0),
                                         ("group_assign_until", 1.5), ("group_assign_strength", 0.0),
                                         ("group_assign_records", 0), ("group_restart_steps", 0)])
def test_pipeline_config_refuses_bad_assignment_settings(field, value):
    with pytest.raises(ValueError, match=field):
        PipelineConfig(num_users=3, **{field: value})
