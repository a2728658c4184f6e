"""A patched tiny Llama trained with backend triton ends where backend torch does (fp32)."""

import os

import pytest
import torch
from _helpers.models import tiny_llama

import proper

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def train(backend: str, steps: int = 20) -> list[float]:
    # The narrower MLP of this test's original model: 20 steps of it lower the loss (the check below).
    model = tiny_llama(seed=0, intermediate_size=40, max_position_embeddings=32).to(DEVICE)
    cfg = proper.ProperConfig(num_experts=4, top_k=2, rank=4, alpha=8.0, user_rank=4, user_alpha=4.0,
                              num_users=6, router=("token", "user", "lora"), backend=backend)
    proper.patch_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    model.train()
    for _ in range(steps):
        users = torch.randint(-1, 6, (3,), generator=g)
        ids = torch.randint(0, 64, (3, 9), generator=g).to(DEVICE)
        with proper.user_context(model, users):
            out = model(input_ids=ids, labels=ids)
        aux = proper.aux_losses(model)
        loss = out.loss + 0.1 * aux["load_balance"] + 0.1 * aux["distinctness"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    layer = next(iter(proper.proper_layers(model).values()))
    assert layer.last_backend == backend
    return losses


def test_twenty_steps_triton_equals_torch():
    ref = train("torch")
    got = train("triton")
    assert ref[-1] < ref[0]  # it did learn something
    for a, b in zip(got, ref):
        assert abs(a - b) <= 1e-4 * abs(b), (got, ref)
