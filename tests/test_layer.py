"""ProperLinear on its own: init, forward against the reference, dropout, dtypes, aux losses."""

import pytest
import torch
import torch.nn as nn

import proper
from proper_kernels import reference


def make(d_in=6, d_out=5, dtype=torch.float64, **cfg):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).to(dtype)
    kw = dict(num_experts=4, top_k=2, rank=3, alpha=6.0, user_rank=2, user_alpha=3.0, num_users=4,
              router=("token", "user", "lora"), target_modules=["x"])
    kw.update(cfg)
    return proper.ProperLinear(base, proper.ProperConfig(**kw))


def test_parameter_layout_and_init():
    l = make()
    assert l.lora_A.shape == (4, 3, 6) and l.lora_B.shape == (4, 5, 3)
    assert l.router_x.shape == (4, 6) and l.router_user.shape == (5, 4) and l.router_h.shape == (4, 2)
    assert l.user_A.shape == (4, 2, 6) and l.user_B.shape == (4, 5, 2)
    assert l.scaling == 2.0 and l.user_scaling == 1.5 and l.top_k == 2 and l.temperature == 1.0
    assert torch.count_nonzero(l.lora_B) == 0 and torch.count_nonzero(l.user_B) == 0
    assert l.lora_A.abs().max() <= 1 / 6**0.5 and l.lora_A.std() > 0
    assert not any(p.requires_grad for p in l.base.parameters())
    assert set(l.adapter_parameters()) == {"lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B"}
    l2 = make(router=("token",), num_users=0)
    assert l2.router_user is None and l2.router_h is None and l2.user_A is None and not l2.needs_user_ids
    l3 = make(user_rank=0, router=("user",))  # r_u = 0: no bank, user-aware router only
    assert l3.user_A is None and l3.user_scaling == 0.0 and l3.router_user.shape == (5, 4)


def randomise(layer):
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.normal_(0, 0.5)


def test_forward_equals_base_plus_reference():
    l = make()
    randomise(l)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    ids = torch.tensor([2, -1, 0])
    y = l(x, user_ids=ids)
    expect, _ = reference.proper_linear(
        x, l.base(x), l.lora_A, l.lora_B, l.scaling, top_k=2, temperature=1.0, router_x=l.router_x,
        router_user=l.router_user, router_h=l.router_h, user_ids=ids, user_A=l.user_A, user_B=l.user_B,
        user_scaling=l.user_scaling,
    )
    torch.testing.assert_close(y, expect, rtol=0, atol=0)
    assert l.last_backend == "torch"


def test_dropout_only_in_training_and_only_on_the_adapters():
    l = make(dropout=0.5, router=("token",), num_users=0)
    randomise(l)
    x = torch.randn(64, 6, dtype=torch.float64)
    l.eval()
    y_eval = l(x)
    assert torch.equal(y_eval, l(x))
    l.train()
    torch.manual_seed(1)
    y1 = l(x)
    torch.manual_seed(2)
    y2 = l(x)
    assert not torch.allclose(y1, y2)
    # The token router sees x without dropout: routing in training equals routing in eval.
    assert torch.equal(l._routing.indices, reference.router_topk(x @ l.router_x.t(), 2)[1])


def test_adapters_run_in_their_dtype_and_return_the_base_dtype():
    """float32 adapters on a bfloat16 base (as PEFT allows): the result has the base's dtype."""
    l = make(dtype=torch.float32)
    randomise(l)
    x = torch.randn(2, 3, 6)
    ids = torch.tensor([0, 1])
    y32 = l(x, user_ids=ids)
    with torch.no_grad():
        l.base.to(torch.bfloat16)
    y = l(x.bfloat16(), user_ids=ids)
    assert y.dtype == torch.bfloat16 and l.lora_A.dtype == torch.float32
    torch.testing.assert_close(y.float(), y32, rtol=2e-2, atol=2e-2)


def test_load_balance_loss():
    l = make(router=("token",), num_users=0, num_experts=4, top_k=1)
    assert l.load_balance_loss().item() == 0.0  # nothing recorded yet
    with torch.no_grad():
        l.router_x.zero_()  # uniform probabilities, every token to expert 0
    l.train()
    l(torch.randn(10, 6, dtype=torch.float64))
    # f = (1, 0, 0, 0), P = 1/4 each: E * sum f P = 4 * 1/4 = 1
    assert l.load_balance_loss().item() == pytest.approx(1.0)
    with torch.no_grad():
        l.router_x.copy_(torch.eye(4, 6, dtype=torch.float64) * 50)
    x = torch.eye(4, 6, dtype=torch.float64).repeat(3, 1)  # each expert wins 3 tokens, p ~ one-hot
    l(x)
    assert l.load_balance_loss().item() == pytest.approx(1.0, abs=1e-6)
    x = torch.eye(4, 6, dtype=torch.float64)[[0] * 12]  # all tokens to expert 0 with p ~ 1
    l(x)
    assert l.load_balance_loss().item() == pytest.approx(4.0, abs=1e-6)
    loss = l.load_balance_loss()
    loss.backward()
    assert l.router_x.grad is not None and l.router_x.grad.abs().sum() > 0
    l.eval()
    l(x)
    assert l.load_balance_loss().item() == 0.0  # eval forwards record nothing


def test_distinctness_loss():
    l = make(num_experts=3, rank=2, d_in=6, d_out=6)
    with torch.no_grad():
        eye = torch.eye(6, dtype=torch.float64)
        l.lora_A.copy_(torch.stack([eye[0:2], eye[2:4], eye[4:6]]))
        l.lora_B.copy_(torch.stack([eye[:, 0:2], eye[:, 2:4], eye[:, 4:6]]))
    assert l.distinctness_loss().item() == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        l.lora_A.copy_(l.lora_A[0].expand(3, 2, 6))
        l.lora_B.copy_(l.lora_B[0].expand(3, 6, 2))
    assert l.distinctness_loss().item() == pytest.approx(2.0)  # A and B each fully parallel
    assert make(num_experts=1, top_k=1).distinctness_loss().item() == 0.0
    l.distinctness_loss().backward()
    assert l.lora_A.grad is not None


def test_merge_folds_the_population_lora_exactly():
    l = make(num_experts=1, top_k=1, router=(), num_users=0)
    randomise(l)
    x = torch.randn(5, 6, dtype=torch.float64)
    before = l(x)
    l.merge()
    assert torch.count_nonzero(l.lora_B) == 0
    torch.testing.assert_close(l.base(x), before, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l(x), before, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="single expert"):
        make().merge()
