"""Bad input gets a clear error naming the argument; NaN propagates or, in check mode, raises."""

import pytest
import torch
import torch.nn as nn

import proper
import proper_kernels
from _helpers.cases import make_case

F32 = torch.float32


def case32(**over):
    c = make_case(0, 6, 5, 4, 4, 2, 3, 2, 3, ("token", "user", "lora"), cold=True)
    c = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in c.items()}
    c.update(over)
    return c


def call(**over):
    return proper_kernels.proper_linear(**case32(**over), backend="torch")


@pytest.mark.parametrize(
    "over,exc,pattern",
    [
        (dict(x=torch.ones(6, 5, dtype=torch.long)), TypeError, "x must be a floating"),
        (dict(x=torch.ones(6, 7)), ValueError, "x has 7 features"),
        (dict(lora_A=torch.ones(4, 3, 5, dtype=torch.float64)), TypeError, "lora_A has dtype"),
        (dict(lora_A=torch.ones(4, 5)), ValueError, "lora_A must have 3 dimensions"),
        (dict(lora_B=torch.ones(4, 4, 2)), ValueError, "lora_B must have shape"),
        (dict(base_out=torch.ones(5, 4)), ValueError, "base_out must have shape"),
        (dict(router_x=torch.ones(3, 5)), ValueError, "router_x must have shape"),
        (dict(router_user=torch.ones(5, 4)), ValueError, "router_user must have shape"),
        (dict(router_h=torch.ones(4, 3)), ValueError, "router_h must have shape"),
        (dict(user_B=torch.ones(3, 4, 3)), ValueError, "user_B must have shape"),
        (dict(user_A=None), ValueError, "user_A and user_B"),
        (dict(user_ids=torch.zeros(5, dtype=torch.long)), ValueError, "user_ids must have one id per token"),
        (dict(user_ids=torch.zeros(6)), TypeError, "user_ids must be an integer tensor"),
        (dict(user_ids=[0, 1, 2, 0, 1, 2]), TypeError, "user_ids must be a torch.Tensor"),
        (dict(user_ids=torch.tensor([0, 1, -2, 0, 1, 2])), ValueError, "user_ids contains -2"),
        (dict(user_ids=torch.tensor([0, 1, 3, 0, 1, 2])), ValueError, "user_ids contains 3"),
        (dict(top_k=0), ValueError, "top_k must be"),
        (dict(top_k=5), ValueError, "top_k must be"),
        (dict(temperature=0.0), ValueError, "temperature must be"),
        (dict(dropout=1.0), ValueError, "dropout must be"),
        (dict(x=torch.ones(6, 5, device="meta")), ValueError, "is on cpu but x is on meta"),
    ],
)
def test_op_rejects_bad_input(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(**over)


def test_unavailable_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        proper_kernels.proper_linear(**case32(), backend="fast")
    for name in ("triton", "cuda"):
        if name not in proper_kernels.available_backends("cpu"):
            with pytest.raises(RuntimeError, match=f"backend='{name}' cannot run"):
                proper_kernels.proper_linear(**case32(), backend=name)
    # On the CPU "auto" is the torch backend, even where the Triton interpreter could run.
    assert proper_kernels.select_backend("auto", "cpu") == "torch"
    assert "torch" in proper_kernels.available_backends("cpu")
    with pytest.raises(RuntimeError, match="float64 runs on backend='torch'"):
        proper_kernels.select_backend("triton", "cpu", torch.float64)


@pytest.mark.parametrize(
    "triton_version, numpy_version, refused",
    [("3.6.0", "2.4.0", True), ("3.6.1", "2.5.2", True), ("3.6.0", "2.3.5", False), ("3.7.1", "2.4.6", False),
     ("3.8.0", "2.5.0rc1", False), ("3.10.0", "3.0.0", False)],
)
def test_interpreter_versions_that_cannot_run_the_kernels(triton_version, numpy_version, refused):
    from proper_kernels.dispatch import interpreter_problem

    why = interpreter_problem(triton_version, numpy_version)
    if refused:
        assert f"triton {triton_version}" in why and f"numpy {numpy_version}" in why and "triton >= 3.7" in why
    else:
        assert why is None


def test_triton_on_a_broken_interpreter_is_a_clear_error_and_auto_stays_on_torch(monkeypatch):
    from proper_kernels import dispatch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_installed_interpreter_problem", lambda: "the interpreter of triton 3.6.0 fails")
    if dispatch._TRITON_ERROR is not None:
        pytest.skip(dispatch._TRITON_ERROR)
    assert "triton" not in proper_kernels.available_backends("cpu", torch.float32)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run on cpu.*triton 3.6.0 fails"):
        proper_kernels.proper_linear(**case32(), backend="triton")
    assert proper_kernels.select_backend("auto", "cpu", torch.float32) == "torch"


def test_router_topk_rejects_bad_input():
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        proper_kernels.router_topk(torch.ones(3), 1)
    with pytest.raises(ValueError, match="top_k must be"):
        proper_kernels.router_topk(torch.ones(3, 4), 5)
    with pytest.raises(TypeError, match="logits must be a floating"):
        proper_kernels.router_topk(torch.ones(3, 4, dtype=torch.long), 1)


def test_nan_in_input_propagates_to_that_token_only():
    c = case32()
    c["x"] = c["x"].clone()
    c["x"][2, 1] = float("nan")
    y, routing = proper_kernels.proper_linear(**c, return_routing=True, backend="torch")
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3, 4, 5]]).all()
    E = c["lora_A"].shape[0]
    assert ((routing.indices >= 0) & (routing.indices < E)).all()


def test_nan_in_router_logits_gives_nan_output_and_valid_indices():
    c = case32(user_ids=torch.tensor([0, 1, 2, 0, 1, 2]))
    c["router_user"] = c["router_user"].clone()
    c["router_user"][1, 2] = float("nan")  # user 1's logits are NaN
    c["lora_B"] = torch.zeros_like(c["lora_B"])  # even a fresh adapter must not hide it
    y, routing = proper_kernels.proper_linear(**c, return_routing=True, backend="torch")
    assert torch.isnan(y[[1, 4]]).all()
    assert torch.isfinite(y[[0, 2, 3, 5]]).all()
    assert ((routing.indices >= 0) & (routing.indices < c["lora_A"].shape[0])).all()
    gates, idx = proper_kernels.router_topk(torch.tensor([[0.1, float("nan"), 0.3]]), 2)
    assert torch.isnan(gates).all() and ((idx >= 0) & (idx < 3)).all()


def test_check_mode_raises_on_nan(monkeypatch):
    monkeypatch.setenv("PROPER_CHECK_FINITE", "1")
    c = case32()
    c["x"] = c["x"].clone()
    c["x"][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="x contains NaN"):
        proper_kernels.proper_linear(**c, backend="torch")
    c = case32()
    c["router_user"] = c["router_user"].clone()
    c["router_user"][-1, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="router logits contain|router logits contains"):
        proper_kernels.proper_linear(**c, backend="torch")
    with pytest.raises(FloatingPointError, match="logits contains NaN"):
        proper_kernels.router_topk(torch.tensor([[float("nan"), 1.0]]), 1)
    # finite input passes in check mode
    assert torch.isfinite(proper_kernels.proper_linear(**case32(), backend="torch")).all()


def layer(**cfg):
    base = nn.Linear(5, 4)
    config = proper.ProperConfig(**{**dict(num_experts=3, top_k=2, rank=2, user_rank=2, num_users=3,
                                           router=("token", "user", "lora"), target_modules=["x"]), **cfg})
    return proper.ProperLinear(base, config)


def test_layer_rejects_bad_input():
    l = layer()
    with pytest.raises(TypeError, match="x must be a floating"):
        l(torch.ones(2, 5, dtype=torch.long), user_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="x must end with 5 features"):
        l(torch.ones(2, 6), user_ids=torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="user_context"):
        l(torch.ones(2, 5))
    with pytest.raises(ValueError, match="user_ids contains 3"):
        l(torch.ones(2, 5), user_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="user_ids must have one id per token"):
        l(torch.ones(2, 4, 5), user_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        proper.ProperLinear(nn.Conv2d(2, 2, 1), proper.ProperConfig())
    with pytest.raises(TypeError, match="config must be a proper.ProperConfig"):
        proper.ProperLinear(nn.Linear(2, 2), {"num_experts": 2})


@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(num_experts=0), "num_experts must be >= 1"),
        (dict(top_k=3, num_experts=2), "top_k must be in"),
        (dict(rank=0), "rank must be >= 1"),
        (dict(num_users=-1), "num_users must be >= 0"),
        (dict(router=("token", "bogus")), "router must be"),
        (dict(router=("lora",), num_users=0), "needs the user bank"),
        (dict(temperature=0), "temperature must be positive"),
        (dict(dropout=1.5), "dropout must be in"),
        (dict(backend="fast"), "backend must be one of"),
        (dict(target_modules=[]), "target_modules"),
        (dict(rank=2.5), "rank must be an int"),
    ],
)
def test_config_rejects_bad_values(kw, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        proper.ProperConfig(**kw)


def test_config_json_round_trip():
    cfg = proper.ProperConfig(num_experts=3, top_k=1, num_users=7, router=("user", "lora"), target_modules="model.*proj")
    assert proper.ProperConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown ProperConfig fields"):
        proper.ProperConfig.from_dict({"num_experts": 2, "bogus": 1})


def test_the_cuda_backend_refuses_sparse_user_gradients():
    from proper_kernels import cuda_backend

    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="needs the triton or torch backend"):
        cuda_backend.proper_linear(x, x, torch.randn(1, 2, 8), torch.zeros(1, 8, 2), 1.0, top_k=1, sparse_grad=True)
