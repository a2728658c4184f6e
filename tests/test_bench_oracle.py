"""Every variant the op benchmark times computes the layer's function: checked against the
torch backend in float64 on the benchmark's own quick goal cases, layers and inputs.

Each variant runs in float32 with gradients (output, dx and every adapter gradient) and,
forward only, in float16 (the 16-bit rounding of base_out, h and y). Tokens whose top-k set
differs from the reference's (a near-tie) are left out of the output norm and counted; at
most MAX_ROUTING_MISMATCH of the tokens may differ. The Triton backend runs under the
interpreter (TRITON_INTERPRET=1), where the benchmark itself leaves it out.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn as nn
from torch import Tensor

from proper.apps.bench import (InputSet, PeftStyleLayer, cast_layer, goal_cases, make_inputs, make_layer,
                               make_variants, proper_call)

CPU = torch.device("cpu")
# relative error (||out - ref|| / ||ref||) in float32, for the output and every gradient
TOL_FP32 = 1e-4
# the same in float16, output only
TOL_FP16 = 5e-3
MAX_ROUTING_MISMATCH = 1e-3
CASES = {c.label: c for c in goal_cases(quick=True)}
BACKENDS = {"proper-torch": "torch", "proper-triton": "triton"}
VARIANTS = ("linear", *BACKENDS, "peft-moe")


def _needs(variant: str) -> None:
    if variant == "proper-triton" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("the Triton backend runs on the CPU only under TRITON_INTERPRET=1")


def _rel(a: Optional[Tensor], ref: Optional[Tensor]) -> float:
    if ref is None:
        return 0.0 if a is None or not bool(a.any()) else float("inf")
    if a is None:
        a = torch.zeros_like(ref)
    ref = ref.double()
    den = ref.norm().item()
    num = (a.double() - ref).norm().item()
    if math.isnan(num):
        return float("inf")
    return num / den if den > 0 else num


def _same_topk(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """[T] bool: the tokens whose sets of top-k experts agree (None when either is unknown)."""
    if a is None or b is None:
        return None
    return (a.sort(dim=-1).values == b.sort(dim=-1).values).all(dim=-1)


@dataclass
class Oracle:
    y: Tensor  # [T, out] float64
    grads: dict  # x and adapter grads, float64
    indices: Optional[Tensor]


@functools.lru_cache(maxsize=None)
def _case(label: str):
    """(float32 master layer, input set, oracle of the op, oracle of the linear floor)."""
    case = CASES[label]
    master = make_layer(case, CPU, torch.float16)  # float32, every value exact in float16
    (s,) = make_inputs(case, 1, CPU, torch.float16)
    s = InputSet(s.x.detach().float().requires_grad_(True), s.dy.float(), s.ids, s.ids_host)
    layer64 = cast_layer(master, torch.float64)
    return master, s, _oracle(layer64, s, linear=False), _oracle(layer64, s, linear=True)


def _oracle(layer64, s: InputSet, linear: bool) -> Oracle:
    x = s.x.detach().double().requires_grad_(True)
    s64 = InputSet(x, s.dy.double(), s.ids, s.ids_host)
    for p in layer64.adapter_parameters().values():
        p.grad = None
    if linear:
        y, idx = nn.functional.linear(x, layer64.base.weight), None
    else:
        y, routing = proper_call(layer64, "torch", s64, return_routing=True)
        idx = routing.indices
    y.backward(s64.dy)
    grads = {"x": x.grad}
    if not linear:
        grads.update({n: p.grad.clone() for n, p in layer64.adapter_parameters().items()})
    return Oracle(y.detach().reshape(-1, y.shape[-1]), grads, idx)


def _variant(layer, name: str):
    """The benchmark's variant `name` on `layer`, with its adapter grads and top-k indices."""
    (v,) = [v for v in make_variants(layer, BACKENDS) if v.name == name]
    if name == "linear":
        return v, (lambda: {}), (lambda s: None)
    if name == "peft-moe":
        assert isinstance(v.module, PeftStyleLayer)

        def idx(s):
            with torch.no_grad():
                v.fn(s)
            return v.module.last_indices

        return v, v.module.adapter_grads, idx

    def idx(s):
        with torch.no_grad():
            return proper_call(layer, v.backend, s, return_routing=True)[1].indices

    return v, (lambda: {n: p.grad for n, p in layer.adapter_parameters().items()}), idx


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("label", list(CASES))
def test_float32_output_and_gradients_match_float64(label, variant):
    _needs(variant)
    master, s, ref_op, ref_lin = _case(label)
    ref = ref_lin if variant == "linear" else ref_op
    layer = cast_layer(master, torch.float32)
    v, grads_of, indices_of = _variant(layer, variant)
    x = s.x.detach().clone().requires_grad_(True)
    sv = InputSet(x, s.dy, s.ids, s.ids_host)
    for p in v.params:
        p.grad = None
    y = v.fn(sv)
    y.backward(sv.dy)
    y2 = y.detach().reshape(-1, y.shape[-1])
    same = _same_topk(indices_of(sv), ref.indices)
    if variant != "linear":
        assert same is not None, "the top-k indices of the variant are known"
        mismatch = int((~same).sum())
        assert mismatch <= MAX_ROUTING_MISMATCH * y2.shape[0], mismatch
    keep = same if same is not None and not bool(same.all()) else slice(None)
    assert _rel(y2[keep], ref.y[keep]) <= TOL_FP32
    got = {"x": x.grad, **grads_of()}
    errs = {n: _rel(got.get(n), g) for n, g in ref.grads.items()}
    assert max(errs.values()) <= TOL_FP32, errs
    if variant != "linear":
        assert set(ref.grads) == {"x", "lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B"}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("label", list(CASES))
def test_float16_forward_matches_float64(label, variant):
    _needs(variant)
    master, s, ref_op, ref_lin = _case(label)
    ref = ref_lin if variant == "linear" else ref_op
    layer = cast_layer(master, torch.float16)
    v, _, indices_of = _variant(layer, variant)
    s16 = InputSet(s.x.detach().half(), None, s.ids, s.ids_host)
    with torch.no_grad():
        y = v.fn(s16).reshape(-1, ref.y.shape[-1])
    assert bool(torch.isfinite(y).all())
    same = _same_topk(indices_of(s16), ref.indices)
    keep = same if same is not None and not bool(same.all()) else slice(None)
    assert _rel(y[keep], ref.y[keep]) <= TOL_FP16


def test_the_peft_style_users_are_peft_mixed_batch():
    """The PEFT-style layer's per-user LoRAs give what peft's ``adapter_names=`` gives."""
    peft = pytest.importorskip("peft")
    case = CASES["prefill"]
    case = type(case)(**{**case.__dict__, "bank": 5, "users": 3, "batch": 4, "seq": 8, "d_in": 32, "d_out": 24,
                         "name": "users"})
    layer = make_layer(case, CPU, torch.float32)
    (s,) = make_inputs(case, 1, CPU, torch.float32, grad=False)
    ours = PeftStyleLayer.from_proper(layer)
    ours.scaling = 0.0  # the experts add nothing: what is left is the base and the users
    holder = nn.Module()
    holder.proj = nn.Linear(case.d_in, case.d_out, bias=False)
    holder.proj.weight = nn.Parameter(layer.base.weight.detach().clone(), requires_grad=False)
    cfg = peft.LoraConfig(r=layer.user_rank, lora_alpha=layer.user_rank * layer.user_scaling,
                          target_modules=["proj"], lora_dropout=0.0)
    model = peft.get_peft_model(holder, cfg, adapter_name="u0")
    for u in range(1, case.bank):
        model.add_adapter(f"u{u}", cfg)
    lora = model.base_model.model.proj
    with torch.no_grad():
        for u in range(case.bank):
            lora.lora_A[f"u{u}"].weight.copy_(layer.user_A[u])
            lora.lora_B[f"u{u}"].weight.copy_(layer.user_B[u])
        want = lora(s.x, adapter_names=[f"u{u}" for u in s.ids_host])
        got = ours(s.x, s.ids, s.ids_host)
    assert len(set(s.ids_host)) == 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
