"""torch.compile traces a patched model through the ProperLinear ops without graph breaks."""

import os

import pytest
import torch
from _helpers.models import tiny_llama

import proper

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch"]
if INTERPRET or torch.cuda.is_available():
    BACKENDS.append("triton")


def device_for(backend: str) -> torch.device:
    """Triton runs on the GPU, or on the CPU only under the interpreter."""
    return torch.device("cuda" if backend == "triton" and not INTERPRET else "cpu")


def patched_llama(backend):
    model = tiny_llama(seed=0, layers=1)
    cfg = proper.ProperConfig(num_experts=4, top_k=2, rank=4, user_rank=2, num_users=5,
                              router=("token", "user", "lora"), backend=backend)
    proper.patch_model(model, cfg)
    with torch.no_grad():
        for layer in proper.proper_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
            layer.user_B.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_forward_and_backward(backend):
    device = device_for(backend)
    model = patched_llama(backend).to(device)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32, device=device)
    users = torch.tensor([3, -1], device=device)

    def step(x):
        return mlp(x).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with proper.user_context(model, users):
        eager_loss = step(x)
        eager_loss.backward()
        eager_grads = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.grad is not None}
        mlp.zero_grad()
        loss = compiled(x)
        loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    assert eager_grads
    for n, p in mlp.named_parameters():
        if n in eager_grads:
            torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-5, atol=1e-6)
