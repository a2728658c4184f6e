"""The three stages chain on a tiny Llama: each starts from the previous one's result."""

import pytest
import torch
from conftest import LLAMA, NUM_USERS, VOCAB

import proper
from proper.stages import PipelineConfig, build_stage_model, is_done, load_stage, run_stage
from proper.trainer import TrainConfig


def batch_at(step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (4, 8), generator=g)
    return {"input_ids": ids, "labels": ids, "user_rows": torch.randint(-1, NUM_USERS, (4,), generator=g)}


def test_stages_chain_and_resume(tmp_path):
    tc = TrainConfig(steps=3, lr=1e-2, save_every=2, progress=False)
    cfg = PipelineConfig(num_users=NUM_USERS, target_modules=LLAMA.targets, num_experts=4, top_k=2, rank=4,
                         user_rank=2, train={1: tc, 2: tc, 3: tc})
    with pytest.raises(RuntimeError, match="needs stage 1 first"):
        run_stage(LLAMA.build, batch_at, tmp_path, cfg, 2)
    for stage in (1, 2, 3):
        assert run_stage(LLAMA.build, batch_at, tmp_path, cfg, stage)
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
