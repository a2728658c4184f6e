"""The op level: one ProperLinear layer call against its floor and the PEFT-style layer.

Variants: ``linear`` (F.linear(x, W), the floor), ``proper[-<backend>]`` (F.linear plus
proper_kernels.proper_linear, as ProperLinear.forward runs it inside ``proper.user_context``:
ids validated once per batch, so ``check_user_ids=False``), ``proper-compile`` (the torch
path under ``torch.compile``) and ``peft-moe`` (baselines.PeftStyleLayer, copied from the
same layer). Modes: ``forward`` (no grad), ``full`` (forward + backward) and ``backward``
alone, timed as ``torch.autograd.backward(y, dy, retain_graph=True)`` on graphs built
beforehand, one per input set (where a backend cannot run backward twice on one graph, full
minus forward is reported and ``backward_method`` says so).

Inputs rotate among sets whose x alone exceeds 1.5x the L2 cache on CUDA (4 on the CPU);
every tensor is random and non-zero, so no work is skipped. A forward row's ``bytes`` are
the fewest one call must move: W, x and y once, the router weights, the user rows and the
LoRAs of the experts some token of the batch picked.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .baselines import PeftStyleLayer

MODES = ("forward", "backward", "full")  # the order of the rows
TIMING_ORDER = ("forward", "full", "backward")  # backward may fall back on full minus forward
BYTES_MODEL = ("forward rows: W + x + y + router weights + (experts picked by any token) * r * (in + out) "
               "+ (users in the batch) * (r_u * (in + out) + E), times the element size")


@dataclass
class OpCase:
    sweep: str
    batch: int  # sequences, one user each
    seq: int
    d_in: int
    d_out: int
    experts: int
    top_k: int
    rank: int
    user_rank: int
    users: int  # distinct users in the batch (<= batch)
    bank: int  # rows in the user bank
    routers: tuple = ("token", "user")
    name: str = ""  # the case's label (default: sweep, tokens, users, experts)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def label(self) -> str:
        return self.name or f"{self.sweep}:{self.tokens}x{self.users}u{self.experts}e"

    def shape(self) -> dict:
        return {"tokens": self.tokens, "batch": self.batch, "seq": self.seq, "in": self.d_in, "out": self.d_out,
                "experts": self.experts, "top_k": self.top_k, "rank": self.rank, "user_rank": self.user_rank,
                "users": self.users, "bank": self.bank, "routers": list(self.routers)}

    def flops(self, op: bool = True) -> float:
        T, i, o = self.tokens, self.d_in, self.d_out
        f = 2 * T * i * o
        if op:
            f += 2 * T * self.top_k * self.rank * (i + o) + 2 * T * self.user_rank * (i + o) + 2 * T * i * self.experts
            if "lora" in self.routers:
                f += 2 * T * self.user_rank * self.experts
        return f

    def min_bytes(self, elem: int, experts_used: float, op: bool = True) -> float:
        T, i, o, E = self.tokens, self.d_in, self.d_out, self.experts
        n = i * o + T * i + T * o
        if op:
            n += E * i + (E * self.user_rank if "lora" in self.routers else 0) + self.users * E
            n += experts_used * self.rank * (i + o) + self.users * self.user_rank * (i + o)
        return n * elem


def op_cases(device: torch.device, quick: bool) -> list[OpCase]:
    """``proper bench``'s sweeps over tokens, distinct users and experts."""
    gpu = device.type == "cuda"
    d = 4096 if gpu else 256
    seq = 512 if gpu else 32
    bank = 1000 if gpu else 100
    r = 16 if gpu else 8
    tokens_b = ([2, 8, 32] if quick else [4, 16, 64]) if gpu else ([2, 8, 32] if quick else [1, 4, 16, 64])
    users_b = [1, 8, 32] if quick else [1, 4, 16, 64]
    experts = [1, 4, 16] if quick else [1, 2, 4, 8, 16, 32]
    cases = [OpCase("tokens", b, seq, d, d, 8, 2, r, r, b, bank) for b in tokens_b]
    ub = max(users_b)
    cases += [OpCase("users", ub, seq // 4, d, d, 8, 2, r, r, u, bank) for u in users_b]
    cases += [OpCase("experts", 8, seq, d, d, e, min(2, e), r, r, 8, bank) for e in experts]
    return cases


def goal_cases(quick: bool) -> list[OpCase]:
    """The goal cases (the layer of proper_kernels/reference.py, routers token + user + lora):
    prefill, 8 sequences x 1024 tokens of 8 users, and decode, 64 sequences x 1 token of 64
    users, in = out = 4096, E=8, k=2, r = r_u = 16, 1000 users; ``quick``: in = out = 256,
    100 users, 4 x 64 and 16 x 1 tokens."""
    d, bank, pre, dec = (256, 100, (4, 64), (16, 1)) if quick else (4096, 1000, (8, 1024), (64, 1))
    routers = ("token", "user", "lora")
    return [OpCase("goal", pre[0], pre[1], d, d, 8, 2, 16, 16, pre[0], bank, routers, "prefill"),
            OpCase("goal", dec[0], dec[1], d, d, 8, 2, 16, 16, dec[0], bank, routers, "decode")]


def make_layer(case: OpCase, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A float32 ProperLinear with every tensor random (B not zero, so no work is skipped),
    each value representable in `dtype`, so that a cast copy computes the very same function."""
    import proper

    cfg = proper.ProperConfig(
        num_experts=case.experts, top_k=case.top_k, rank=case.rank, alpha=2.0 * case.rank, user_rank=case.user_rank,
        user_alpha=2.0 * case.user_rank, num_users=case.bank, router=tuple(case.routers), dropout=0.0,
        target_modules=["proj"], backend="torch")
    layer = proper.ProperLinear(nn.Linear(case.d_in, case.d_out, bias=False, device=device), cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    scale = {"base.weight": case.d_in ** -0.5, "lora_A": case.d_in ** -0.5, "lora_B": case.rank ** -0.5,
             "router_x": case.d_in ** -0.5, "router_user": 1.0, "router_h": case.user_rank ** -0.5,
             "user_A": case.d_in ** -0.5, "user_B": case.user_rank ** -0.5}  # every term of y is O(1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_((torch.randn(p.shape, generator=g, device=device) * scale[name]).to(dtype).float())
    return layer.eval()


def cast_layer(layer, dtype: torch.dtype):
    out = copy.deepcopy(layer).to(dtype)
    out.base.weight.requires_grad_(False)
    return out


@dataclass
class InputSet:
    x: Tensor  # [batch, seq, in]
    dy: Optional[Tensor]  # [batch, seq, out], the upstream gradient (modes with backward)
    ids: Tensor  # [batch] user ids on the device, one per sequence
    ids_host: list  # the same ids on the host


def make_inputs(case: OpCase, n: int, device: torch.device, dtype: torch.dtype, grad: bool = True,
                seed: int = 1) -> list[InputSet]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    sets = []
    for _ in range(n):
        present = torch.randperm(case.bank, generator=g)[: case.users]  # distinct users
        ids = present[torch.arange(case.batch) % case.users]
        x = torch.randn(case.batch, case.seq, case.d_in, generator=g).to(device=device, dtype=dtype)
        dy = torch.randn(case.batch, case.seq, case.d_out, generator=g).to(device=device, dtype=dtype) if grad else None
        sets.append(InputSet(x.requires_grad_(grad), dy, ids.to(device), ids.tolist()))
    return sets


def num_input_sets(case: OpCase, device: torch.device, dtype: torch.dtype) -> int:
    """Enough input sets that their x alone exceeds 1.5x the L2 cache (at least 4, at most 128)."""
    if device.type != "cuda":
        return 4
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)
    return int(min(128, max(4, math.ceil(1.5 * l2 / (case.tokens * case.d_in * dtype.itemsize)))))


def proper_call(layer, backend: str, s: InputSet, return_routing: bool = False, fn: Optional[Callable] = None):
    """What ProperLinear.forward runs: the base product, then the fused op (in place without grad)."""
    import proper_kernels

    grad = torch.is_grad_enabled()
    base_out = F.linear(s.x, layer.base.weight, layer.base.bias)
    return (fn or proper_kernels.proper_linear)(
        s.x, base_out, layer.lora_A, layer.lora_B, layer.scaling, top_k=layer.top_k, temperature=layer.temperature,
        router_x=layer.router_x, router_user=layer.router_user, router_h=layer.router_h, user_ids=s.ids,
        user_A=layer.user_A, user_B=layer.user_B, user_scaling=layer.user_scaling, dropout=0.0, training=grad,
        return_routing=return_routing, check_user_ids=False, backend=backend, inplace=not grad)


@dataclass
class Variant:
    name: str
    backend: str  # what the row reports ("auto" until the first call resolves it)
    fn: Callable[[InputSet], Tensor]  # one layer call on an input set
    params: list  # trainable tensors (their .grad is reset between timed runs)
    notes: str = ""
    module: Optional[nn.Module] = None  # the baseline's module, where there is one


def make_variants(layer, proper_backends: dict, compile_ok: bool = False) -> list[Variant]:
    """linear, proper variants (name -> backend), proper-compile, peft-moe, in that order."""
    W = layer.base.weight
    adapters = list(layer.adapter_parameters().values())
    out = [Variant("linear", "torch", lambda s: F.linear(s.x, W), [])]
    for name, b in proper_backends.items():
        out.append(Variant(name, b, lambda s, b=b: proper_call(layer, b, s), adapters))
    if compile_ok:
        import proper_kernels

        compiled = torch.compile(proper_kernels.proper_linear, dynamic=True)
        out.append(Variant("proper-compile", "torch+inductor", lambda s: proper_call(layer, "torch", s, fn=compiled),
                           adapters))
    peft = PeftStyleLayer.from_proper(layer)
    out.append(Variant("peft-moe", "torch", lambda s: peft(s.x, s.ids, s.ids_host),
                       [p for p in peft.parameters() if p.requires_grad],
                       f"holds all {layer.num_users} users' LoRAs as nn.Linear modules", peft))
    return out


def available_backends(device: torch.device, dtype: torch.dtype) -> tuple[dict, list[str]]:
    """({"proper-<b>": b} for the backends that run here, notes on those skipped)."""
    import proper_kernels

    run, notes = {}, []
    for b in ("cuda", "triton", "torch"):
        if b == "triton" and (device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"):
            notes.append("proper-triton skipped: Triton needs a CUDA device and TRITON_INTERPRET unset "
                         "(the interpreter is not for timing)")
            continue
        try:
            proper_kernels.select_backend(b, device, dtype)
        except RuntimeError as e:
            notes.append(f"proper-{b} skipped: {e}")
            continue
        run[f"proper-{b}"] = b
    return run, notes
