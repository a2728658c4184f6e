"""Speed and peak memory of ONE ProperLinear layer call (the op), side by side with its floor
and with a naive PEFT-style implementation.

    python -m benchmarks.bench_op [--device cuda|cpu] [--dtype bf16|fp16|fp32] [--quick] [--out FILE.json]

Variants, timed in the same run:
  linear        F.linear(x, W) alone: the frozen base layer, the floor. For backward/full, x
                requires grad and W is frozen (one GEMM for dx).
  proper-<b>    F.linear(x, W) + proper_kernels.proper_linear(..., backend=b), for b in cuda,
                triton, torch (those available on the device; a missing one is noted). This is
                what ProperLinear.forward does inside ``proper.user_context`` (ids validated
                once per batch, so ``check_user_ids=False``).
  naive-peft    the same math written as a PEFT user would: nn.Linear modules per expert and
                per user (all users held, as PEFT holds every adapter), a Python loop over the
                experts (nonzero -> gather -> B(A(x)) * gate * s -> index_add) and PEFT's
                mixed-batch ``adapter_names`` loop over the users present.

Cases (the layer of proper_kernels/reference.py; routers token + user + lora, E=8, k=2, r=r_u=16, 1000 users):
  prefill       8 sequences x 1024 tokens of 8 users, in = out = 4096   (T = 8192)
  decode        64 sequences x 1 token of 64 distinct users, same layer (T = 64)
``--quick`` (implied by ``--device cpu``) shrinks both to in = out = 256, 100 users, T = 256 / 16.

Modes: forward (no grad); full (forward + backward); backward = the backward alone, timed as
``torch.autograd.backward(y, dy, retain_graph=True)`` on graphs built beforehand, one per
input set (where a backend cannot run backward twice on one graph, full minus forward is
reported instead and the row says so in ``backward_method``).

Timing (see the device tool's METHOD.md): on CUDA, CUDA events through
``triton.testing.do_bench`` (median and the 20th/80th percentiles, after warm-up; do_bench
also flushes the L2 cache before each run), rotating among input sets whose x alone exceeds
the L2 cache; random inputs and random (non-zero) adapters. On the CPU, time.perf_counter
with warm-up, repeats and the median. Peak memory is torch.cuda.max_memory_allocated over
the memory allocated just before one call (inputs, weights and, for backward, the saved
graph are the baseline); null on the CPU.

Before timing, every variant is checked in float32 against the torch backend in float64 on
the same inputs (output and gradients; tokens whose top-k set differs from the oracle's,
a near-tie, are left out of the norm and counted). A wrong variant is flagged in its rows
(``ok: false``, WRONG in the table) and makes the exit status 1.

Writes the rows as JSON (header: device, versions, date, settings) to --out (default
benchmarks/results/op-<device>-<date>.json) and the markdown table next to it (.md), and
prints the table last.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import proper
import proper_kernels
from proper.apps.bench import OpCase, _fmt, device_name
from proper.apps.bench import versions as suite_versions
from proper.layer import ProperLinear

SCHEMA = "proper.bench_op/1"
MODES = ("forward", "backward", "full")  # the order of the rows
TIMING_ORDER = ("forward", "full", "backward")  # backward may fall back on full minus forward
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Correctness: relative error (||out - ref|| / ||ref||) of each variant run in float32 against
# the torch backend in float64, for the output and for every gradient (dx and the adapters').
TOL_FP32 = 1e-4
# The same check on the timed run's dtype (output only): 16-bit rounding of base_out, h and y.
TOL_BENCH = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
# At most this share of tokens may pick a different top-k set than the oracle (near-ties).
MAX_ROUTING_MISMATCH = 1e-3


# -- cases ------------------------------------------------------------------------------------


def Case(name: str, batch: int, seq: int, d_in: int, d_out: int, experts: int, top_k: int, rank: int,
         user_rank: int, num_users: int) -> OpCase:
    """One case (``proper bench``'s OpCase): `batch` sequences of distinct users, one each,
    from a bank of `num_users` rows; ``case.sweep`` is its name ("prefill" / "decode")."""
    return OpCase(name, batch, seq, d_in, d_out, experts, top_k, rank, user_rank, batch, num_users)


def cases(quick: bool) -> list[OpCase]:
    if quick:
        d, users = 256, 100
        return [
            Case("prefill", 4, 64, d, d, 8, 2, 16, 16, users),
            Case("decode", 16, 1, d, d, 8, 2, 16, 16, users),
        ]
    d, users = 4096, 1000
    return [
        Case("prefill", 8, 1024, d, d, 8, 2, 16, 16, users),
        Case("decode", 64, 1, d, d, 8, 2, 16, 16, users),
    ]


def make_layer(case: OpCase, device: torch.device, dtype: torch.dtype, seed: int = 0) -> ProperLinear:
    """A ProperLinear with every tensor random (B not zero, so no work is skipped), each value
    representable in `dtype` so that upcast copies compute the very same function."""
    cfg = proper.ProperConfig(
        num_experts=case.experts, top_k=case.top_k, rank=case.rank, alpha=2.0 * case.rank,
        user_rank=case.user_rank, user_alpha=2.0 * case.user_rank, num_users=case.bank,
        router=("token", "user", "lora"), dropout=0.0, target_modules=["proj"], backend="torch",
    )
    base = nn.Linear(case.d_in, case.d_out, bias=False, device=device, dtype=torch.float32)
    layer = ProperLinear(base, cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    scale = {  # std of each tensor: every term of y and of the logits is O(1)
        "base.weight": case.d_in ** -0.5, "lora_A": case.d_in ** -0.5, "lora_B": case.rank ** -0.5,
        "router_x": case.d_in ** -0.5, "router_user": 1.0, "router_h": case.user_rank ** -0.5,
        "user_A": case.d_in ** -0.5, "user_B": case.user_rank ** -0.5,
    }
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_((torch.randn(p.shape, generator=g, device=device) * scale[name]).to(dtype).float())
    return layer.eval()


def cast_layer(layer: ProperLinear, dtype: torch.dtype) -> ProperLinear:
    out = copy.deepcopy(layer).to(dtype)
    out.base.weight.requires_grad_(False)
    return out


@dataclass
class InputSet:
    x: Tensor  # [batch, seq, in]
    dy: Tensor  # [batch, seq, out], the upstream gradient for backward
    ids: Tensor  # [batch] user ids on the device (one per sequence)
    ids_host: list[int]  # the same ids on the host (PEFT's adapter_names are a Python list)


def make_inputs(case: OpCase, n: int, device: torch.device, dtype: torch.dtype, seed: int = 1) -> list[InputSet]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    sets = []
    for _ in range(n):
        ids = torch.randperm(case.bank, generator=g)[: case.batch]  # distinct users
        x = torch.randn(case.batch, case.seq, case.d_in, generator=g).to(device=device, dtype=dtype)
        dy = torch.randn(case.batch, case.seq, case.d_out, generator=g).to(device=device, dtype=dtype)
        sets.append(InputSet(x.requires_grad_(True), dy, ids.to(device), ids.tolist()))
    return sets


def num_input_sets(case: OpCase, device: torch.device, dtype: torch.dtype) -> int:
    """Enough input sets that their x alone exceeds 1.5x the L2 cache (at least 4, at most 128)."""
    if device.type != "cuda":
        return 4
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)
    per_set = case.tokens * case.d_in * torch.finfo(dtype).bits // 8
    return int(min(128, max(4, math.ceil(1.5 * l2 / per_set))))


# -- the naive PEFT-style layer ---------------------------------------------------------------


def _linear_from(weight: Tensor) -> nn.Linear:
    """An nn.Linear (no bias) holding its own copy of `weight` [out, in], as PEFT's lora_A/B."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone())
    return lin


class NaivePeftProper(nn.Module):
    """PROPER as a PEFT user would write it: a module per expert and per user, Python loops.

    Experts: the Mixtral/LoRAMoE loop (router Linear, softmax, top-k, then per expert the
    tokens routed to it by nonzero, B(A(x[sel])) * gate * s_g, index_add). Users: PEFT's
    mixed-batch ``adapter_names`` path (for each user present, the sequences of that user,
    their LoRA, added in place). Every user's LoRA is held (PEFT keeps all adapters loaded).
    """

    def __init__(self, layer: ProperLinear) -> None:
        super().__init__()
        self.base = layer.base
        self.top_k, self.temperature = layer.top_k, layer.temperature
        self.scaling, self.user_scaling = layer.scaling, layer.user_scaling
        self.num_users, self.user_rank = layer.num_users, layer.user_rank
        E = layer.num_experts
        self.experts_A = nn.ModuleList(_linear_from(layer.lora_A[e]) for e in range(E))
        self.experts_B = nn.ModuleList(_linear_from(layer.lora_B[e]) for e in range(E))
        self.router_x = _linear_from(layer.router_x)
        self.router_user = nn.Embedding(layer.num_users + 1, E, device="meta")
        self.router_user.weight = nn.Parameter(layer.router_user.detach().clone())
        self.router_h = _linear_from(layer.router_h)
        self.user_A = nn.ModuleDict({str(u): _linear_from(layer.user_A[u]) for u in range(layer.num_users)})
        self.user_B = nn.ModuleDict({str(u): _linear_from(layer.user_B[u]) for u in range(layer.num_users)})
        self.last_indices: Optional[Tensor] = None

    def forward(self, x: Tensor, ids: Tensor, ids_host: list[int]) -> Tensor:
        B, S, d_in = x.shape
        T = B * S
        result = self.base(x)  # [B, S, out]
        # User LoRA, PEFT's mixed batch: one sub-batch per adapter present.
        h_u = x.new_zeros(B, S, self.user_rank)
        for u in sorted(set(ids_host)):
            if u < 0:
                continue
            rows = [i for i, v in enumerate(ids_host) if v == u]
            hu = self.user_A[str(u)](x[rows])
            h_u[rows] = hu
            result[rows] += self.user_B[str(u)](hu) * self.user_scaling
        # Router: token + user-aware + LoRA-aware logits, softmax, top-k, renormalise.
        xt = x.reshape(T, d_in)
        tok_ids = ids.repeat_interleave(S)
        rows = torch.where(tok_ids >= 0, tok_ids, torch.full_like(tok_ids, self.num_users))
        logits = self.router_x(xt) + self.router_user(rows) + self.router_h(h_u.reshape(T, -1))
        probs = torch.softmax(logits / self.temperature, dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)
        self.last_indices = top_i.detach()
        # Experts: a Python loop, each over the tokens routed to it.
        out = result.reshape(T, -1)
        for e in range(len(self.experts_A)):
            tok, slot = torch.nonzero(top_i == e, as_tuple=True)
            if tok.numel() == 0:
                continue
            ye = self.experts_B[e](self.experts_A[e](xt[tok]))
            out.index_add_(0, tok, ye * (gates[tok, slot].unsqueeze(-1) * self.scaling))
        return out.reshape(result.shape)

    def adapter_grads(self) -> dict[str, Optional[Tensor]]:
        """The gradients laid out as ProperLinear's parameters (zeros for unused modules)."""

        def stack(mods) -> Tensor:
            return torch.stack([m.weight.grad if m.weight.grad is not None else torch.zeros_like(m.weight)
                                for m in mods])

        return {
            "lora_A": stack(self.experts_A), "lora_B": stack(self.experts_B),
            "router_x": self.router_x.weight.grad, "router_user": self.router_user.weight.grad,
            "router_h": self.router_h.weight.grad,
            "user_A": stack(self.user_A.values()), "user_B": stack(self.user_B.values()),
        }


# -- variants ---------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    backend: Optional[str]  # the proper_kernels backend, or None
    fn: Callable[[InputSet], Tensor]  # one layer call on an input set
    params: list[Tensor]  # trainable tensors (their .grad is reset between timed runs)
    grads: Callable[[], dict[str, Optional[Tensor]]]  # adapter gradients by ProperLinear name
    indices: Callable[[InputSet], Optional[Tensor]]  # the top-k indices [T, k] of a call, or None
    notes: str = ""


def _proper_call(layer: ProperLinear, backend: str, s: InputSet, return_routing: bool = False):
    base_out = F.linear(s.x, layer.base.weight, layer.base.bias)
    return proper_kernels.proper_linear(
        s.x, base_out, layer.lora_A, layer.lora_B, layer.scaling, top_k=layer.top_k,
        temperature=layer.temperature, router_x=layer.router_x, router_user=layer.router_user,
        router_h=layer.router_h, user_ids=s.ids, user_A=layer.user_A, user_B=layer.user_B,
        user_scaling=layer.user_scaling, dropout=0.0, training=torch.is_grad_enabled(),
        return_routing=return_routing, check_user_ids=False, backend=backend,
    )


def make_variants(layer: ProperLinear, backends: list[str]) -> list[Variant]:
    W = layer.base.weight
    out = [Variant("linear", None, lambda s: F.linear(s.x, W), [], lambda: {}, lambda s: None)]
    adapters = list(layer.adapter_parameters().values())
    for b in backends:
        def indices(s, b=b):
            with torch.no_grad():
                return _proper_call(layer, b, s, return_routing=True)[1].indices

        out.append(Variant(
            f"proper-{b}", b, lambda s, b=b: _proper_call(layer, b, s), adapters,
            lambda: {n: p.grad for n, p in layer.adapter_parameters().items()}, indices,
        ))
    naive = NaivePeftProper(layer)

    def naive_indices(s):
        with torch.no_grad():
            naive(s.x, s.ids, s.ids_host)
        return naive.last_indices

    out.append(Variant(
        "naive-peft", None, lambda s: naive(s.x, s.ids, s.ids_host),
        [p for p in naive.parameters() if p.requires_grad], naive.adapter_grads, naive_indices,
        notes=f"holds all {layer.num_users} users' LoRAs as nn.Linear modules",
    ))
    return out


def proper_backends(device: torch.device, dtype: torch.dtype) -> tuple[list[str], list[str]]:
    """(backends to run, notes on those skipped)."""
    run, notes = [], []
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
        run.append(b)
    return run, notes


# -- correctness ------------------------------------------------------------------------------


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
    grads: dict[str, Optional[Tensor]]  # x and adapter grads, float64
    indices: Optional[Tensor]


def oracle(layer64: ProperLinear, s: InputSet, linear: bool) -> Oracle:
    x = s.x.detach().double().requires_grad_(True)
    s64 = InputSet(x, s.dy.double(), s.ids, s.ids_host)
    for p in layer64.adapter_parameters().values():
        p.grad = None
    if linear:
        y, idx = F.linear(x, layer64.base.weight), None
    else:
        y, routing = _proper_call(layer64, "torch", s64, return_routing=True)
        idx = routing.indices
    y.backward(s64.dy)
    grads = {"x": x.grad}
    if not linear:
        grads.update({n: p.grad for n, p in layer64.adapter_parameters().items()})
    return Oracle(y.detach().reshape(-1, y.shape[-1]), grads, idx)


def check_variant(v: Variant, s: InputSet, ref: Oracle, dtype: torch.dtype) -> dict:
    """Run v once on s (cast to `dtype`) with grads and compare with the oracle."""
    x = s.x.detach().to(dtype).requires_grad_(True)
    sv = InputSet(x, s.dy.to(dtype), s.ids, s.ids_host)
    for p in v.params:
        p.grad = None
    y = v.fn(sv)
    y.backward(sv.dy)
    same = _same_topk(v.indices(sv), ref.indices)
    y2 = y.detach().reshape(-1, y.shape[-1])
    if same is not None and not bool(same.all()):
        err_y = _rel(y2[same], ref.y[same])
    else:
        err_y = _rel(y2, ref.y)
    grads = {"x": x.grad, **v.grads()}
    err_g = max(_rel(grads.get(n), g) for n, g in ref.grads.items())
    mismatch = 0 if same is None else int((~same).sum())
    for p in v.params:
        p.grad = None
    return {"rel_err": err_y, "rel_err_grad": err_g, "routing_mismatch": mismatch, "tokens": y2.shape[0]}


def check_forward(v: Variant, s: InputSet, ref: Oracle) -> float:
    """Output error of v on the timed dtype (no grad), over the tokens routed like the oracle."""
    with torch.no_grad():
        y = v.fn(s).reshape(-1, ref.y.shape[-1])
    same = _same_topk(v.indices(s), ref.indices)
    if same is not None and not bool(same.all()):
        return _rel(y[same], ref.y[same])
    return _rel(y, ref.y)


# -- timing -----------------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float
    p20_ms: Optional[float]
    p80_ms: Optional[float]
    reps: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, params: list[Tensor], budget_ms: float) -> Timing:
    """Median and 20th/80th percentiles of fn's time in ms (grads reset before every run)."""

    def reset():
        for p in params:
            p.grad = None

    if device.type == "cuda":
        import triton.testing

        reset()
        fn()  # compile, allocator, handles
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        est = max(start.elapsed_time(end) / 3, 1e-3)
        reps = int(min(2000, max(20, budget_ms / est)))
        med, p20, p80 = triton.testing.do_bench(
            fn, warmup=max(25.0, 5 * est), rep=reps * est, grad_to_none=params or None, quantiles=[0.5, 0.2, 0.8]
        )
        return Timing(float(med), float(p20), float(p80), reps)

    for _ in range(2):  # warm-up
        reset()
        fn()
    times: list[float] = []
    t_end = time.perf_counter() + budget_ms / 1e3
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 200):
        reset()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return Timing(float(q[0]), float(q[1]), float(q[2]), len(times))


class Rotation:
    """Cycles through the input sets, one per call."""

    def __init__(self, n: int) -> None:
        self.n, self.i = n, -1

    def __call__(self) -> int:
        self.i = (self.i + 1) % self.n
        return self.i


def time_mode(v: Variant, mode: str, sets: list[InputSet], device: torch.device, budget_ms: float,
              fwd_timing: Optional[Timing], full_timing: Optional[Timing]) -> tuple[Timing, str]:
    """Time one variant in one mode; returns (timing, how backward was timed or '')."""
    nxt = Rotation(len(sets))
    leaves = v.params + [s.x for s in sets]
    if mode == "forward":
        def fwd():
            with torch.no_grad():
                return v.fn(sets[nxt()])

        return time_fn(fwd, device, [], budget_ms), ""
    if mode == "full":
        def full():
            s = sets[nxt()]
            torch.autograd.backward(v.fn(s), s.dy)

        return time_fn(full, device, leaves, budget_ms), ""
    # backward alone: one graph per input set, each backward keeps its graph for the next
    ys = [v.fn(s) for s in sets]
    try:
        for _ in range(2):
            torch.autograd.backward(ys[0], sets[0].dy, retain_graph=True)
        _sync(device)
    except RuntimeError as e:
        ys.clear()
        if fwd_timing is None or full_timing is None:
            raise
        # the spread of a difference is not the difference of spreads: an indication only
        d = lambda a, b: None if a is None or b is None else a - b  # noqa: E731
        t = Timing(full_timing.median_ms - fwd_timing.median_ms, d(full_timing.p20_ms, fwd_timing.p20_ms),
                   d(full_timing.p80_ms, fwd_timing.p80_ms), 0)
        return t, f"full_minus_forward ({type(e).__name__})"

    def bwd():
        i = nxt()
        torch.autograd.backward(ys[i], sets[i].dy, retain_graph=True)

    t = time_fn(bwd, device, leaves, budget_ms)
    ys.clear()  # free the graphs
    return t, "retain_graph"


def peak_mib(v: Variant, mode: str, s: InputSet, device: torch.device) -> Optional[float]:
    """Peak memory of one call over the memory allocated just before it (CUDA only)."""
    if device.type != "cuda":
        return None
    for p in v.params + [s.x]:
        p.grad = None
    gc.collect()
    y = v.fn(s) if mode == "backward" else None  # the graph is part of the baseline
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    if mode == "forward":
        with torch.no_grad():
            out = v.fn(s)
    elif mode == "full":
        out = v.fn(s)
        torch.autograd.backward(out, s.dy)
    else:
        torch.autograd.backward(y, s.dy)
        out = None
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out, y
    for p in v.params + [s.x]:
        p.grad = None
    return peak / 2**20


# -- bytes and bandwidth ----------------------------------------------------------------------


def decode_bytes(case: OpCase, dtype: torch.dtype, experts_used: float, users_used: float, op: bool) -> float:
    """The fewest bytes one forward call must move: W once, x, y and, for the op, the router
    weights, the experts selected by any token of the batch and the users' rows."""
    el = torch.finfo(dtype).bits // 8
    T, d_in, d_out, E = case.tokens, case.d_in, case.d_out, case.experts
    n = d_in * d_out + T * d_in + T * d_out
    if op:
        n += E * d_in + E * case.user_rank  # router_x, router_h
        n += users_used * E  # router_user rows
        n += experts_used * case.rank * (d_in + d_out)
        n += users_used * case.user_rank * (d_in + d_out)
    return n * el


def copy_bandwidth(device: torch.device) -> dict:
    """Measured device-to-device copy bandwidth (bytes read + written per second)."""
    if device.type == "cuda":
        import triton.testing

        n = 256 << 20  # 256 Mi floats: 1 GiB each way
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
        del src, dst
        torch.cuda.empty_cache()
        return {"GBps": 2 * n * 4 / ms / 1e6, "bytes": n * 4, "method": "torch copy_ of 1 GiB fp32, do_bench median"}
    n = 16 << 20  # 64 MiB
    src = torch.randn(n)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, [], 100.0)
    return {"GBps": 2 * n * 4 / t.median_ms / 1e6, "bytes": n * 4, "method": "torch copy_ of 64 MiB fp32, median"}


# -- environment ------------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "device"


def versions() -> dict:
    """``proper bench``'s versions plus the git commit of this checkout."""
    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {**suite_versions(), "git_commit": commit, "git_dirty": dirty}


# -- report -----------------------------------------------------------------------------------


def markdown(header: dict, rows: list[dict]) -> str:
    dev, s = header["device"], header["settings"]
    lines = [
        f"### ProperLinear op: {dev['name']}, {s['dtype']}, {header['date']}",
        "",
        f"torch {header['versions']['torch']}, triton {header['versions']['triton']}, "
        f"CUDA {header['versions']['cuda']}; copy bandwidth {_fmt(dev['bandwidth_GBps'], '.0f')} GB/s; "
        f"backward = {s['backward_timing']}; errors: float32 vs the torch backend in float64 "
        f"(tol {s['tolerance_fp32']:g}), and in {s['dtype']} (tol {s['tolerance_bench']:g}).",
        "",
    ]
    for case in dict.fromkeys(r["case"] for r in rows):
        sh = next(r["shape"] for r in rows if r["case"] == case)
        lines.append(f"- `{case}`: T={sh['T']} ({sh['batch']}x{sh['seq']}), in={sh['in']}, out={sh['out']}, "
                     f"E={sh['E']}, k={sh['k']}, r={sh['r']}, r_u={sh['r_u']}, users={sh['users']} "
                     f"({sh['users_in_batch']} in the batch)")
    for note in header["notes"]:
        lines.append(f"- note: {note}")
    lines += [
        "",
        "| case | mode | variant | median ms | p20-p80 ms | x naive | x linear | peak MiB | GB/s (% copy) "
        "| err fp32 y / grad | err " + s["dtype"] + " y (timed) | ok |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        gb = "-" if r["GBps"] is None else f"{r['GBps']:.{0 if r['GBps'] >= 10 else 2}f}"
        if r["pct_of_bandwidth"] is not None:
            gb += f" ({r['pct_of_bandwidth']:.{0 if r['pct_of_bandwidth'] >= 10 else 1}f}%)"
        ok = "ok" if r["ok"] else ("ERROR" if r["error"] else "WRONG")
        if (r["backward_method"] or "").startswith("full_minus_forward"):
            ok += " (full - forward)"
        spread = "-" if r["p20_ms"] is None else f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"
        lines.append(
            f"| {r['case']} | {r['mode']} | {r['variant']} | {_fmt(r['median_ms'])} | {spread} "
            f"| {_fmt(r['speedup_vs_naive'], '.2f')} | {_fmt(r['ratio_to_linear'], '.2f')} "
            f"| {_fmt(r['peak_mem_mib'], '.1f')} | {gb} | {_fmt(r['rel_err'], '.1e')} / "
            f"{_fmt(r['rel_err_grad'], '.1e')} | {_fmt(r['rel_err_bench_dtype'], '.1e')} | {ok} |"
        )
    errors = dict.fromkeys(f"{r['case']} {r['variant']}: {r['error']}" for r in rows if r["error"])
    if errors:
        lines += ["", "Errors:"] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


def _finite(obj):
    """Strict JSON: a non-finite float (an error of a broken variant) becomes its name."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# -- main -------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_case(case: OpCase, device: torch.device, dtype: torch.dtype, backends: list[str], budget_ms: float,
             bandwidth: Optional[float], dev_name: str, dtype_name: str) -> list[dict]:
    master = make_layer(case, device, dtype)  # float32, every value exact in `dtype`
    sets = make_inputs(case, num_input_sets(case, device, dtype), device, dtype)
    shape = {"T": case.tokens, "in": case.d_in, "out": case.d_out, "E": case.experts, "k": case.top_k,
             "r": case.rank, "r_u": case.user_rank, "users": case.bank, "batch": case.batch,
             "seq": case.seq, "users_in_batch": len(set(sets[0].ids_host))}

    # Correctness first: float32 vs the torch backend in float64, then the timed dtype.
    layer64 = cast_layer(master, torch.float64)
    refs = {"op": oracle(layer64, sets[0], linear=False), "linear": oracle(layer64, sets[0], linear=True)}
    del layer64
    checks: dict[str, dict] = {}
    layer32 = cast_layer(master, torch.float32)
    for v in make_variants(layer32, backends):
        ref = refs["linear" if v.name == "linear" else "op"]
        try:
            checks[v.name] = check_variant(v, sets[0], ref, torch.float32)
        except Exception as e:  # a broken variant is reported, the others still run
            checks[v.name] = {"error": f"{type(e).__name__}: {e}"}
    del layer32
    gc.collect()

    layer = cast_layer(master, dtype)
    del master
    variants = make_variants(layer, backends)
    for v in variants:
        if "error" in checks[v.name]:
            continue
        ref = refs["linear" if v.name == "linear" else "op"]
        try:
            checks[v.name]["rel_err_bench_dtype"] = check_forward(v, sets[0], ref)
        except Exception as e:
            checks[v.name] = {"error": f"{type(e).__name__}: {e}"}
    del refs

    # Bytes a decode forward must move: the experts chosen by any token, the users present.
    experts_used = users_used = None
    if case.sweep == "decode":
        used = []
        for s in sets:
            with torch.no_grad():
                idx = _proper_call(layer, "torch", s, return_routing=True)[1].indices
            used.append(len(set(idx.reshape(-1).tolist())))
        experts_used = sum(used) / len(used)
        users_used = sum(len(set(s.ids_host)) for s in sets) / len(sets)

    rows = []
    timings: dict[str, dict[str, Timing]] = {}
    for mode in TIMING_ORDER:
        for v in variants:
            chk = checks[v.name]
            tol_bench = TOL_BENCH[dtype]
            row = {
                "case": case.sweep, "device": dev_name, "dtype": dtype_name, "shape": shape,
                "variant": v.name, "backend": v.backend, "mode": mode,
                "median_ms": None, "p20_ms": None, "p80_ms": None, "reps": None, "peak_mem_mib": None,
                "bytes_moved": None, "GBps": None, "pct_of_bandwidth": None,
                "rel_err": chk.get("rel_err"), "rel_err_grad": chk.get("rel_err_grad"),
                "rel_err_bench_dtype": chk.get("rel_err_bench_dtype"),
                "routing_mismatch": chk.get("routing_mismatch"), "backward_method": None,
                "input_sets": len(sets), "ok": False, "error": chk.get("error"), "notes": v.notes,
            }
            if row["error"] is None:
                row["ok"] = bool(
                    chk["rel_err"] <= TOL_FP32 and chk["rel_err_grad"] <= TOL_FP32
                    and chk["rel_err_bench_dtype"] <= tol_bench
                    and chk["routing_mismatch"] <= MAX_ROUTING_MISMATCH * chk["tokens"]
                )
                if not row["ok"]:
                    log(f"WRONG: {case.sweep} {v.name}: {chk}")
                try:
                    prev = timings.get(v.name, {})
                    t, how = time_mode(v, mode, sets, device, budget_ms, prev.get("forward"), prev.get("full"))
                    row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps,
                               backward_method=how or None)
                    timings.setdefault(v.name, {})[mode] = t
                    row["peak_mem_mib"] = peak_mib(v, mode, sets[0], device)
                except Exception as e:
                    row.update(ok=False, error=f"{type(e).__name__}: {e}")
                    log(f"ERROR: {case.sweep} {mode} {v.name}: {row['error']}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            if case.sweep == "decode" and mode == "forward" and row["median_ms"]:
                nbytes = decode_bytes(case, dtype, experts_used, users_used, op=v.name != "linear")
                row["bytes_moved"] = nbytes
                row["GBps"] = nbytes / row["median_ms"] / 1e6
                row["pct_of_bandwidth"] = 100 * row["GBps"] / bandwidth if bandwidth else None
            rows.append(row)
            log(f"{case.sweep:8s} {mode:8s} {v.name:14s} {_fmt(row['median_ms'])} ms")
    rows.sort(key=lambda r: MODES.index(r["mode"]))  # stable: variants keep their order
    # ratios within each (case, mode)
    for mode in MODES:
        group = {r["variant"]: r for r in rows if r["mode"] == mode}
        naive = group.get("naive-peft", {}).get("median_ms")
        lin = group.get("linear", {}).get("median_ms")
        for r in group.values():
            m = r["median_ms"]
            r["speedup_vs_naive"] = naive / m if naive and m and m > 0 else None
            r["ratio_to_linear"] = m / lin if lin and m and lin > 0 else None
    return rows


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_op", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="timed dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--quick", action="store_true", help="small shapes (always on for --device cpu)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default benchmarks/results/op-<device>-<date>.json); the table goes next to it (.md)")
    p.add_argument("--budget-ms", type=float, default=None,
                   help="timed runs per measurement, in ms (default 300 on cuda, 150 on cpu)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("--device cuda: no CUDA device is available (use --device cpu)")
        return 2
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    quick = args.quick or device.type == "cpu"
    budget_ms = args.budget_ms or (300.0 if device.type == "cuda" else 150.0)
    torch.manual_seed(0)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())

    dev_name = device_name(device)
    now = _dt.datetime.now(_dt.timezone.utc)
    backends, notes = proper_backends(device, dtype)
    if quick and device.type == "cpu" and not args.quick:
        notes.append("--device cpu implies --quick (small shapes)")
    bw = copy_bandwidth(device)
    log(f"{dev_name}: copy bandwidth {bw['GBps']:.0f} GB/s; backends {backends}")

    rows = []
    for case in cases(quick):
        rows += run_case(case, device, dtype, backends, budget_ms, bw["GBps"], dev_name, dtype_name)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    header = {
        "schema": SCHEMA,
        "date": now.date().isoformat(),
        "timestamp_utc": now.isoformat(timespec="seconds"),
        "command": "python -m benchmarks.bench_op " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": {
            "type": device.type, "name": dev_name, "bandwidth_GBps": bw["GBps"], "bandwidth_method": bw["method"],
            "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
            "l2_cache_bytes": (getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
                               if device.type == "cuda" else None),
        },
        "versions": versions(),
        "settings": {
            "dtype": dtype_name, "quick": quick, "budget_ms": budget_ms,
            "timer": ("CUDA events via triton.testing.do_bench (L2 flushed before each run), median/p20/p80"
                      if device.type == "cuda" else "time.perf_counter, median/p20/p80 after 2 warm-up calls"),
            "backward_timing": "torch.autograd.backward(y, dy, retain_graph=True) on prebuilt graphs "
                               "(rows say full_minus_forward where that failed)",
            "peak_memory": "torch.cuda.max_memory_allocated over memory_allocated before one call (null on cpu)",
            "correctness": "each variant in float32 vs the torch backend in float64 (y, dx and adapter grads), "
                           "and the timed dtype's forward vs the same oracle; tokens with a different top-k set "
                           "are left out and counted in routing_mismatch",
            "tolerance_fp32": TOL_FP32, "tolerance_bench": TOL_BENCH[dtype],
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "decode_bytes": "W + x + y + router weights + (union of selected experts) * r * (in + out) "
                            "+ (users in batch) * (r_u * (in + out) + E), times the element size",
        },
        "notes": notes,
        "rows": rows,
    }
    out = args.out or RESULTS_DIR / f"op-{slug(dev_name)}-{header['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(header), indent=1, allow_nan=False) + "\n")
    table = markdown(header, rows)
    out.with_suffix(".md").write_text(table)
    log(f"wrote {out} and {out.with_suffix('.md')}")
    print(table, flush=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
