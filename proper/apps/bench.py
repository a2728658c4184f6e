"""`proper bench`: speed and memory of proper against what a user would otherwise run.

    proper bench [--device cpu|cuda] [--quick] [--out DIR] [--repeats N] [--table]

On CUDA it first times each backend per phase and writes the table that backend="auto"
reads on this GPU (proper_kernels.auto_table; --table does only that).

Writes ``<DIR>/<device>-<date>.json`` (default DIR: benchmarks/results), the markdown table
next to it (.md) and PNG plots (``-tokens.png``, ``-users.png``, ``-experts.png``: time of one
layer call against the number of tokens, of distinct users in the batch and of experts; on
CUDA also ``-memory.png``, peak memory against tokens).

Variants (each row names it; ``kind`` says which is the floor, ours, or a baseline):

  linear / base       the frozen model alone, no adapters: the floor
  proper              ProperLinear through the dispatcher (backend "auto": torch on the CPU,
                      the CUDA extension or Triton on a GPU)
  proper-torch        our torch reference path, eager (GPU runs only: on the CPU it is ``proper``)
  proper-compile      our torch reference path under ``torch.compile``
  peft-moe            a PEFT-style mixture written as users do today: one LoRA module pair per
                      expert, a router, a Python loop (nonzero -> gather -> B(A x) * gate ->
                      index_add), and the per-user LoRAs through the ``peft`` library's
                      mixed-batch ``adapter_names=`` path
  peft-mixed          (model level) the ``peft`` library itself: one LoRA adapter per user, a
                      mixed batch with ``adapter_names=``
  peft-shared         (model level) ``peft`` with one LoRA shared by every sequence: what a
                      plain LoRA costs, the reference point of "personalization overhead"

Levels: ``op`` (one layer; sweeps over tokens, users, experts), ``block`` (one Llama decoder
layer) and ``model`` (a whole Llama: 4 layers of 256 on the CPU, a ~1B config on a GPU): the
forward of a 64-user mixed batch, and on a GPU a training step and batched generation.

Timing: on the CPU, time.perf_counter over interleaved rounds (every variant of a case once
per round, after warm-up), so that load on a shared machine hits all variants alike; the
median and the 20th/80th percentiles. On CUDA, CUDA events through ``triton.testing.do_bench``
(warm-up, L2 flushed before each run, median and percentiles), rotating between input sets
larger than the L2 cache for the op level. The same run measures the device's peaks (a large
matmul and a device copy) for the roofline columns.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

SCHEMA = "proper.apps.bench/1"
KINDS = {"linear": "floor", "base": "floor", "proper": "ours", "proper-torch": "ours", "proper-compile": "ours",
         "peft-moe": "baseline", "peft-mixed": "baseline", "peft-shared": "baseline", "lora": "baseline"}
ROW_FIELDS = ("level", "sweep", "case", "variant", "kind", "device", "dtype", "shape", "backend", "mode",
              "median_ms", "p20_ms", "p80_ms", "reps", "peak_mib", "tflops", "gbps", "tokens_per_s", "times_ms")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- environment --------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name or platform.machine() or 'CPU'} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    import transformers

    import proper
    import proper_kernels

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "proper": proper.__version__,
           "cuda_extension": proper_kernels.cuda_extension_error() or "loaded"}
    for mod in ("triton", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    times_ms: list = field(default_factory=list, repr=False)  # per round, in round order (CPU)


def _quantiles(times: Sequence[float]) -> Timing:
    q = torch.tensor(list(times), dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return Timing(float(q[0]), float(q[1]), float(q[2]), len(times), list(times))


def paired_overhead(t: Timing, base: Timing) -> Timing:
    """The per-round differences t - base (same round, so machine load mostly cancels);
    on CUDA, where rounds are not paired, the difference of the medians."""
    if t.times_ms and len(t.times_ms) == len(base.times_ms):
        return _quantiles([a - b for a, b in zip(t.times_ms, base.times_ms)])
    d = t.median_ms - base.median_ms
    return Timing(d, d, d, t.reps)


def resolved_at_noise(d: Timing) -> bool:
    """Whether a paired difference is told apart from zero: its p20..p80 spread is on one side."""
    return d.p20_ms > 0 or d.p80_ms < 0


def describe_overhead(d: Timing) -> str:
    if resolved_at_noise(d):
        return f"{d.median_ms:.1f} ms"
    return f"not resolved at this noise ({d.p20_ms:.1f}..{d.p80_ms:.1f} ms)"


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int,
                     warmup: int = 2) -> dict[str, Timing]:
    """Every function once per round, rounds in a rotating order; per-function quantiles (ms)."""
    if device.type == "cuda":
        import triton.testing

        out = {}
        for name, fn in fns.items():
            med, p20, p80 = triton.testing.do_bench(fn, warmup=50, rep=max(100, 20 * rounds),
                                                    quantiles=[0.5, 0.2, 0.8])
            out[name] = Timing(float(med), float(p20), float(p80), rounds)
        return out
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: _quantiles(t) for n, t in times.items()}


def peak_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure_peaks(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    """The device's achievable matmul TFLOP/s and copy GB/s, measured now."""
    n = 1024 if (quick or device.type == "cpu") else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    m = 16 << 20 if device.type == "cpu" else 256 << 20
    src = torch.randn(m, device=device)
    dst = torch.empty_like(src)
    t = time_interleaved({"mm": lambda: a @ b, "copy": lambda: dst.copy_(src)}, device, 9 if quick else 25)
    return {"matmul_tflops": 2 * n**3 / (t["mm"].median_ms * 1e-3) / 1e12,
            "matmul": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')} matmul, median",
            "copy_gbps": 2 * m * 4 / (t["copy"].median_ms * 1e-3) / 1e9,
            "copy": f"copy_ of {m * 4 >> 20} MiB fp32 (read + write), median"}


# -- the op level ---------------------------------------------------------------------------------


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

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def shape(self) -> dict:
        return {"tokens": self.tokens, "batch": self.batch, "seq": self.seq, "in": self.d_in, "out": self.d_out,
                "experts": self.experts, "top_k": self.top_k, "rank": self.rank, "user_rank": self.user_rank,
                "users": self.users, "bank": self.bank}

    def flops_bytes(self, elem: int) -> tuple[float, float]:
        T, i, o = self.tokens, self.d_in, self.d_out
        flops = 2 * T * i * o + 2 * T * self.top_k * self.rank * (i + o) + 2 * T * self.user_rank * (i + o)
        flops += 2 * T * i * self.experts  # the token router
        weights = i * o + self.experts * self.rank * (i + o) + self.users * self.user_rank * (i + o)
        return flops, elem * (weights + T * (i + 2 * o))


def op_cases(device: torch.device, quick: bool) -> list[OpCase]:
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


class PeftStyleLayer(nn.Module):
    """The group + user layer as users write it with peft today (see the module docstring)."""

    def __init__(self, layer, num_users: int) -> None:
        super().__init__()
        import peft

        holder = nn.Module()
        holder.proj = nn.Linear(layer.in_features, layer.out_features, bias=False, device=layer.lora_A.device,
                                dtype=layer.lora_A.dtype)
        holder.proj.weight = nn.Parameter(layer.base.weight.detach().clone(), requires_grad=False)
        cfg = peft.LoraConfig(r=layer.user_rank, lora_alpha=layer.user_rank * layer.user_scaling,
                              target_modules=["proj"], lora_dropout=0.0)
        self.peft_model = peft.get_peft_model(holder, cfg, adapter_name="u0")
        for u in range(1, num_users):
            self.peft_model.add_adapter(f"u{u}", cfg)
        self.lora = self.peft_model.base_model.model.proj
        with torch.no_grad():
            for u in range(num_users):
                self.lora.lora_A[f"u{u}"].weight.copy_(layer.user_A[u])
                self.lora.lora_B[f"u{u}"].weight.copy_(layer.user_B[u])
        E = layer.num_experts
        mk = lambda w: nn.Parameter(w.detach().clone())  # noqa: E731
        self.experts_A = nn.ParameterList(mk(layer.lora_A[e]) for e in range(E))
        self.experts_B = nn.ParameterList(mk(layer.lora_B[e]) for e in range(E))
        self.router_x = mk(layer.router_x)
        self.router_user = nn.Embedding.from_pretrained(layer.router_user.detach().clone(), freeze=False)
        self.top_k, self.scaling = layer.top_k, layer.scaling

    def forward(self, x: Tensor, names: list[str], rows: Tensor) -> Tensor:
        y = self.lora(x, adapter_names=names)  # base + every sequence's own LoRA, peft's loop
        B, S, d = x.shape
        xt = x.reshape(-1, d)
        logits = xt @ self.router_x.t() + self.router_user(rows).repeat_interleave(S, dim=0)
        top_p, top_i = torch.softmax(logits, -1).topk(self.top_k, -1)
        gates = top_p / top_p.sum(-1, keepdim=True)
        out = y.reshape(B * S, -1)
        for e in range(len(self.experts_A)):
            tok, slot = torch.nonzero(top_i == e, as_tuple=True)
            if tok.numel():
                ye = (xt[tok] @ self.experts_A[e].t()) @ self.experts_B[e].t()
                out = out.index_add(0, tok, ye * (gates[tok, slot, None] * self.scaling))
        return out.reshape(y.shape)


def _op_layer(case: OpCase, device, dtype):
    import proper

    cfg = proper.ProperConfig(num_experts=case.experts, top_k=case.top_k, rank=case.rank, alpha=2.0 * case.rank,
                              user_rank=case.user_rank, user_alpha=2.0 * case.user_rank, num_users=case.bank,
                              router=("token", "user"))
    layer = proper.ProperLinear(nn.Linear(case.d_in, case.d_out, bias=False), cfg).to(device, dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.02)
        layer.user_B.normal_(0.0, 0.02)
    return layer


def run_op(device, dtype, dtype_name: str, quick: bool, rounds: int, compile_ok: bool, log) -> list[dict]:
    import proper_kernels

    rows = []
    for case in op_cases(device, quick):
        torch.manual_seed(0)
        layer = _op_layer(case, device, dtype).eval()
        ids_host = [u % case.users for u in range(case.batch)]
        ids = torch.tensor(ids_host, device=device)
        names = [f"u{u}" for u in ids_host]
        n_sets = 1
        if device.type == "cuda":  # rotate inputs whose x alone exceeds the L2 cache
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
            n_sets = max(1, min(8, math.ceil(2 * l2 / (case.tokens * case.d_in * dtype.itemsize))))
        xs = [torch.randn(case.batch, case.seq, case.d_in, device=device, dtype=dtype) for _ in range(n_sets)]
        it = {"i": 0}

        def nxt() -> Tensor:
            it["i"] = (it["i"] + 1) % n_sets
            return xs[it["i"]]

        W = layer.base.weight
        peft_layer = PeftStyleLayer(layer, case.users).eval()

        def ours(backend: str, fn=None):
            def call():
                x = nxt()
                return (fn or proper_kernels.proper_linear)(
                    x, F.linear(x, W), layer.lora_A, layer.lora_B, layer.scaling, top_k=layer.top_k,
                    router_x=layer.router_x, router_user=layer.router_user, user_ids=ids, user_A=layer.user_A,
                    user_B=layer.user_B, user_scaling=layer.user_scaling, check_user_ids=False, backend=backend,
                    inplace=True)
            return call

        fns = {"linear": lambda: F.linear(nxt(), W), "proper": ours("auto")}
        if device.type == "cuda":
            fns["proper-torch"] = ours("torch")
        if compile_ok:
            fns["proper-compile"] = ours("torch", torch.compile(proper_kernels.proper_linear, dynamic=True))
        fns["peft-moe"] = lambda: peft_layer(nxt(), names, ids)
        with torch.inference_mode():
            proper_kernels.proper_linear  # noqa: B018 - resolve the backend once outside timing
            fns["proper"]()
            backend = proper_kernels.last_backend("proper_linear")
            timings = time_interleaved(fns, device, rounds)
            peaks = {n: peak_mib(f, device) for n, f in fns.items()}
        flops, nbytes = case.flops_bytes(dtype.itemsize)
        for name, t in timings.items():
            lin = name == "linear"
            f = 2 * case.tokens * case.d_in * case.d_out if lin else flops
            b = dtype.itemsize * (case.d_in * case.d_out + case.tokens * (case.d_in + case.d_out)) if lin else nbytes
            rows.append(_row("op", case.sweep, f"{case.sweep}:{case.tokens}x{case.users}u{case.experts}e", name,
                             device, dtype_name, case.shape(),
                             {"proper": backend, "proper-torch": "torch", "proper-compile": "torch+inductor"}.get(
                                 name, "torch"), "forward", t, peaks[name], f, b, case.tokens))
        log(f"op {case.sweep:8s} T={case.tokens:6d} users={case.users:3d} E={case.experts:2d}: " + ", ".join(
            f"{n} {t.median_ms:.3f} ms" for n, t in timings.items()))
        gc.collect()
    return rows


def _row(level, sweep, case, variant, device, dtype_name, shape, backend, mode, t: Timing, peak, flops, nbytes,
         tokens) -> dict:
    s = t.median_ms * 1e-3
    return {"level": level, "sweep": sweep, "case": case, "variant": variant, "kind": KINDS[variant],
            "device": device.type, "dtype": dtype_name, "shape": shape, "backend": backend, "mode": mode,
            "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "reps": t.reps, "peak_mib": peak,
            "tflops": flops / s / 1e12 if flops else None, "gbps": nbytes / s / 1e9 if nbytes else None,
            "tokens_per_s": tokens / s, "times_ms": t.times_ms}


# -- the block and model levels ---------------------------------------------------------------


@dataclass
class ModelCase:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    users: int = 64
    seq: int = 32
    rank: int = 8
    experts: int = 4
    targets: tuple = ("gate_proj", "up_proj", "down_proj")
    vocab: int = 1000

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.heads, max_position_embeddings=max(64, 2 * self.seq))

    def shape(self) -> dict:
        return {"hidden": self.hidden, "intermediate": self.intermediate, "layers": self.layers,
                "sequences": self.users, "seq": self.seq, "users": self.users, "rank": self.rank,
                "experts": self.experts, "targets": list(self.targets)}


def model_case(device: torch.device, quick: bool) -> ModelCase:
    if device.type == "cuda" and not quick:
        return ModelCase(hidden=2048, intermediate=5632, layers=22, heads=32, seq=128, rank=16, vocab=32000)  # ~1.1B
    return ModelCase(hidden=256, intermediate=688, layers=4, heads=4)


def build_models(mc: ModelCase, device, dtype, with_moe: bool = True) -> dict[str, tuple[nn.Module, Callable]]:
    """variant -> (model, forward(input_ids) -> logits) for the forward of a mixed batch."""
    import peft
    from transformers import LlamaForCausalLM

    import proper

    def fresh():
        torch.manual_seed(0)
        return LlamaForCausalLM(mc.config()).to(device, dtype).eval()

    users = torch.arange(mc.users, device=device)
    names = [f"u{u}" for u in range(mc.users)]
    lcfg = peft.LoraConfig(r=mc.rank, lora_alpha=2 * mc.rank, target_modules=list(mc.targets), lora_dropout=0.0)
    out: dict[str, tuple[nn.Module, Callable]] = {}
    base = fresh()
    out["base"] = (base, lambda ids: base(input_ids=ids).logits)
    shared = peft.get_peft_model(fresh(), lcfg).eval()
    out["peft-shared"] = (shared, lambda ids: shared(input_ids=ids).logits)
    mixed = peft.get_peft_model(fresh(), lcfg, adapter_name="u0")
    for n in names[1:]:
        mixed.add_adapter(n, lcfg)
    mixed.eval()
    out["peft-mixed"] = (mixed, lambda ids: mixed(input_ids=ids, adapter_names=names).logits)
    # the user bank alone: the one group expert is switched off (alpha = 0 skips its products)
    ucfg = proper.ProperConfig(num_experts=1, top_k=1, rank=1, alpha=0.0, router=(), user_rank=mc.rank,
                               user_alpha=2.0 * mc.rank, num_users=mc.users, target_modules=mc.targets)
    ours = proper.patch_model(fresh(), ucfg).eval()

    def run_ours(ids, m=ours):
        with proper.user_context(m, users):
            return m(input_ids=ids).logits

    out["proper"] = (ours, run_ours)
    for model, _ in out.values():  # non-zero adapters, as after training
        for n, p in model.named_parameters():
            if "lora_B" in n or n.endswith("user_B"):
                with torch.no_grad():
                    p.normal_(0.0, 0.01)
    return out


def run_model(device, dtype, dtype_name: str, quick: bool, rounds: int, compile_ok: bool, log) -> tuple[list, dict]:
    mc = model_case(device, quick)
    models = build_models(mc, device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, mc.vocab, (mc.users, mc.seq), generator=g).to(device)
    tokens = mc.users * mc.seq
    fns = {name: (lambda f=f: f(ids)) for name, (_, f) in models.items()}
    if compile_ok:
        ours = models["proper"][0]
        compiled = torch.compile(ours, dynamic=False)
        import proper

        users = torch.arange(mc.users, device=device)

        def run_compiled():
            with proper.user_context(ours, users):
                return compiled(input_ids=ids).logits

        fns["proper-compile"] = run_compiled
    with torch.inference_mode():
        timings = time_interleaved(fns, device, rounds)
        peaks = {n: peak_mib(f, device) for n, f in fns.items()}
    rows = [_row("model", "forward", f"llama-{mc.layers}x{mc.hidden}:{mc.users}users", name, device, dtype_name,
                 mc.shape(), "auto" if name.startswith("proper") else "torch", "forward", t, peaks[name], None, None,
                 tokens) for name, t in timings.items()]
    base = timings["base"].median_ms
    # proper-compile is left out: compiling speeds up the base model's own ops too, so its
    # difference to the eager base is not an adapter cost (its forward time is in the rows)
    paired = {n: paired_overhead(t, timings["base"]) for n, t in timings.items() if n not in ("base", "proper-compile")}
    overhead = {n: t.median_ms for n, t in paired.items()}
    resolved = {n: resolved_at_noise(t) for n, t in paired.items()}
    summary = {
        "model": f"Llama {mc.layers} layers x {mc.hidden} hidden, {mc.users} users x {mc.seq} tokens, per-user "
                 f"LoRA r={mc.rank} on {', '.join(mc.targets)}",
        "base_ms": base,
        "adapter_overhead_ms": overhead,
        "adapter_overhead_p20_p80_ms": {n: [t.p20_ms, t.p80_ms] for n, t in paired.items()},
        "overhead_method": "median over rounds of (variant time - base time in the same round)",
        # resolved: the p20..p80 spread of the paired differences does not cross zero
        "adapter_overhead_resolved": resolved,
        # only where both overheads are resolved and positive; a ratio of noise is not printed
        "overhead_ratio_peft_mixed_over_proper": (overhead["peft-mixed"] / overhead["proper"]
                                                  if resolved["proper"] and resolved["peft-mixed"]
                                                  and overhead["proper"] > 0 and overhead["peft-mixed"] > 0
                                                  else None),
    }
    log("model forward: " + ", ".join(f"{n} {t.median_ms:.1f} ms" for n, t in timings.items()))
    log("adapter overhead: " + ", ".join(f"{n} {describe_overhead(paired[n])}" for n in overhead))
    del models
    gc.collect()
    return rows, summary


class MixtureLinear(nn.Module):
    """A PEFT-style LoRA mixture on one linear layer, as written by hand today: one LoRA pair
    per expert, a token + user router, top-k, then a Python loop over the experts (nonzero ->
    gather -> B(A x) * gate -> index_add). User ids come from `state["ids"]` (one per sequence)."""

    def __init__(self, base: nn.Linear, experts: int, top_k: int, rank: int, num_users: int, state: dict) -> None:
        super().__init__()
        self.base, self.state, self.top_k, self.scaling = base, state, top_k, 2.0
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.A = nn.ParameterList(nn.Parameter(torch.randn(rank, base.in_features, **kw) * base.in_features ** -0.5)
                                  for _ in range(experts))
        self.B = nn.ParameterList(nn.Parameter(torch.randn(base.out_features, rank, **kw) * 0.01)
                                  for _ in range(experts))
        self.router = nn.Linear(base.in_features, experts, bias=False, **kw)
        self.router_user = nn.Embedding(num_users + 1, experts, **kw)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        lead = x.shape[:-1]
        xt = x.reshape(-1, x.shape[-1])
        per_seq = xt.shape[0] // self.state["ids"].shape[0]
        logits = self.router(xt) + self.router_user(self.state["ids"]).repeat_interleave(per_seq, dim=0)
        top_p, top_i = torch.softmax(logits.float(), -1).topk(self.top_k, -1)
        gates = (top_p / top_p.sum(-1, keepdim=True)).to(x.dtype)
        out = y.reshape(xt.shape[0], -1)
        for e in range(len(self.A)):
            tok, slot = torch.nonzero(top_i == e, as_tuple=True)
            if tok.numel():
                ye = (xt[tok] @ self.A[e].t()) @ self.B[e].t()
                out = out.index_add(0, tok, ye * (gates[tok, slot, None] * self.scaling))
        return out.reshape(*lead, -1)


def _train_models(mc: ModelCase, device, dtype) -> dict[str, tuple[nn.Module, Callable]]:
    """variant -> (model, loss(ids)) for a training step: plain LoRA, ProperLinear (group
    experts, token + user-aware routers) and the PEFT-style mixture, on the FFN projections."""
    import peft
    from transformers import LlamaForCausalLM

    import proper

    def fresh():
        torch.manual_seed(0)
        return LlamaForCausalLM(mc.config()).to(device, dtype)

    users = torch.arange(mc.users, device=device)
    out = {}
    lora = peft.get_peft_model(fresh(), peft.LoraConfig(r=mc.rank, lora_alpha=2 * mc.rank,
                                                       target_modules=list(mc.targets), lora_dropout=0.0))
    out["lora"] = (lora, lambda ids: lora(input_ids=ids, labels=ids).loss)
    cfg = proper.ProperConfig(num_experts=mc.experts, top_k=2, rank=mc.rank, alpha=2.0 * mc.rank, user_rank=0,
                              num_users=mc.users, router=("token", "user"), target_modules=mc.targets)
    ours = proper.patch_model(fresh(), cfg)

    def ours_loss(ids):
        with proper.user_context(ours, users):
            return ours(input_ids=ids, labels=ids).loss

    out["proper"] = (ours, ours_loss)
    moe = fresh()
    for p in moe.parameters():
        p.requires_grad_(False)
    state = {"ids": users}
    for name, module in list(moe.named_modules()):
        if name.endswith(tuple(mc.targets)) and isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(moe.get_submodule(parent), child, MixtureLinear(module, mc.experts, 2, mc.rank, mc.users, state))
    out["peft-moe"] = (moe, lambda ids: moe(input_ids=ids, labels=ids).loss)
    return out


def run_train(device, dtype, dtype_name: str, quick: bool, rounds: int, log) -> list[dict]:
    mc = model_case(device, quick)
    models = _train_models(mc, device, dtype)
    ids = torch.randint(0, mc.vocab, (mc.users, mc.seq), generator=torch.Generator().manual_seed(1)).to(device)
    fns = {}
    for name, (model, loss_fn) in models.items():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step(loss_fn=loss_fn, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss_fn(ids).backward()
            opt.step()

        fns[name] = step
    timings = time_interleaved(fns, device, rounds, warmup=1)
    peaks = {n: peak_mib(f, device) for n, f in fns.items()}
    log("training step: " + ", ".join(f"{n} {t.median_ms:.1f} ms" for n, t in timings.items()))
    return [_row("model", "train", f"llama-{mc.layers}x{mc.hidden}:{mc.users}users:E{mc.experts}", name, device,
                 dtype_name, mc.shape(), "auto" if name == "proper" else "torch", "train step", t, peaks[name], None,
                 None, mc.users * mc.seq) for name, t in timings.items()]


def run_generate(device, dtype, dtype_name: str, quick: bool, rounds: int, log) -> list[dict]:
    """Greedy generation for a 64-user batch: the user bank vs peft's mixed-batch generate."""
    import proper

    mc = model_case(device, quick)
    models = build_models(mc, device, dtype)
    new = 8 if (quick or device.type == "cpu") else 64
    ids = torch.randint(0, mc.vocab, (mc.users, mc.seq), generator=torch.Generator().manual_seed(2)).to(device)
    names = [f"u{u}" for u in range(mc.users)]
    users = torch.arange(mc.users, device=device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    ours, mixed = models["proper"][0], models["peft-mixed"][0]

    def gen_ours():
        with proper.user_context(ours, users):
            return ours.generate(input_ids=ids, **kw)

    fns = {"proper": gen_ours, "peft-mixed": lambda: mixed.generate(input_ids=ids, adapter_names=names, **kw)}
    with torch.inference_mode():
        timings = time_interleaved(fns, device, max(3, rounds // 3), warmup=1)
        peaks = {n: peak_mib(f, device) for n, f in fns.items()}
    log("generation: " + ", ".join(f"{n} {mc.users * new / (t.median_ms * 1e-3):.0f} tokens/s"
                                   for n, t in timings.items()))
    shape = {**mc.shape(), "new_tokens": new}
    return [_row("model", "generate", f"llama-{mc.layers}x{mc.hidden}:{mc.users}users:+{new}", name, device,
                 dtype_name, shape, "auto" if name == "proper" else "torch", "generate", t, peaks[name], None, None,
                 mc.users * new) for name, t in timings.items()]


def run_block(device, dtype, dtype_name: str, quick: bool, rounds: int, log) -> list[dict]:
    """One decoder layer of the model case, its FFN projections adapted as at the model level."""
    mc = model_case(device, quick)
    mc = ModelCase(**{**mc.__dict__, "layers": 1})
    models = build_models(mc, device, dtype)
    x = torch.randn(mc.users, mc.seq, mc.hidden, device=device, dtype=dtype)
    pos = torch.arange(mc.seq, device=device)[None].expand(mc.users, -1)
    fns = {}
    import proper

    users = torch.arange(mc.users, device=device)
    for name, (model, _) in models.items():
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        block, rope = core.model.layers[0], core.model.rotary_emb
        pe = rope(x, pos)
        if name == "peft-mixed":
            names = [f"u{u}" for u in range(mc.users)]

            def call(block=block, pe=pe, model=model, names=names):
                with model._enable_peft_forward_hooks(adapter_names=names):
                    return block(x, position_embeddings=pe)
        elif name == "proper":
            def call(block=block, pe=pe, model=model):
                with proper.user_context(model, users):
                    return block(x, position_embeddings=pe)
        else:
            def call(block=block, pe=pe):
                return block(x, position_embeddings=pe)
        fns[name] = call
    with torch.inference_mode():
        timings = time_interleaved(fns, device, rounds)
        peaks = {n: peak_mib(f, device) for n, f in fns.items()}
    log("block forward: " + ", ".join(f"{n} {t.median_ms:.2f} ms" for n, t in timings.items()))
    return [_row("block", "forward", f"llama-block-{mc.hidden}:{mc.users}users", name, device, dtype_name,
                 mc.shape(), "auto" if name == "proper" else "torch", "forward", t, peaks[name], None, None,
                 mc.users * mc.seq) for name, t in timings.items()]


# -- report ---------------------------------------------------------------------------------------


def _fmt(v: Optional[float], spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    h = result
    lines = [f"# proper bench: {h['device']['name']} ({h['device']['type']}), {h['date']}", "",
             f"versions: {', '.join(f'{k} {v}' for k, v in h['versions'].items())}  ",
             f"peaks measured in this run: matmul {h['peaks']['matmul_tflops']:.3f} TFLOP/s ({h['peaks']['matmul']}), "
             f"copy {h['peaks']['copy_gbps']:.1f} GB/s ({h['peaks']['copy']})  ",
             f"timer: {h['settings']['timer']}", ""]
    s = h.get("summary")
    if s:
        lines += [f"## Personalization overhead ({s['model']})", "",
                  "| variant | adapter overhead ms (median) | p20-p80 ms |", "|---|---|---|",
                  f"| base (no adapters, {s['base_ms']:.2f} ms) | - | - |"]
        ok = s.get("adapter_overhead_resolved", {})
        lines += [f"| {n} | {v:.2f} | {s['adapter_overhead_p20_p80_ms'][n][0]:.2f}-"
                  f"{s['adapter_overhead_p20_p80_ms'][n][1]:.2f} |" if ok.get(n, True) else
                  f"| {n} | not resolved at this noise | {s['adapter_overhead_p20_p80_ms'][n][0]:.2f}-"
                  f"{s['adapter_overhead_p20_p80_ms'][n][1]:.2f} |" for n, v in s["adapter_overhead_ms"].items()]
        ratio = s["overhead_ratio_peft_mixed_over_proper"]
        lines += ["", "PEFT `adapter_names` overhead / proper overhead: "
                  + (f"{ratio:.1f}x" if ratio is not None else
                     "not resolved at this noise (an overhead's p20..p80 spread crosses zero)"), ""]
        if "train_step_ms" in s:
            t = s["train_step_ms"]
            lines += [f"Training step (same model, {s['model'].split(',')[0]}, 4 experts top-2 on the FFN): "
                      f"plain LoRA {t['lora']:.1f} ms, proper {t['proper']:.1f} ms "
                      f"({s['train_proper_over_lora']:.2f}x LoRA), PEFT-style mixture {t['peft-moe']:.1f} ms "
                      f"({s['train_peft_moe_over_proper']:.2f}x proper).  ",
                      "Batched generation, one user per sequence: " + ", ".join(
                          f"{n} {v:.0f} tokens/s" for n, v in s["generate_tokens_per_s"].items())
                      + f" ({s['generate_proper_over_peft_mixed']:.2f}x).", ""]
    lines += ["## All rows", "", "| level | case | variant | kind | backend | median ms | p20-p80 ms | reps | "
              "TFLOP/s | % peak | GB/s | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    peak = h["peaks"]["matmul_tflops"]
    for r in h["rows"]:
        pct = None if r["tflops"] is None else 100 * r["tflops"] / peak
        lines.append(f"| {r['level']} | {r['case']} | {r['variant']} | {r['kind']} | {r['backend']} | "
                     f"{r['median_ms']:.3f} | {r['p20_ms']:.3f}-{r['p80_ms']:.3f} | {r['reps']} | "
                     f"{_fmt(r['tflops'], '.3f')} | {_fmt(pct, '.1f')} | {_fmt(r['gbps'], '.1f')} | "
                     f"{_fmt(r['peak_mib'], '.1f')} |")
    return "\n".join(lines) + "\n"


def plots(result: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    xkey = {"tokens": "tokens", "users": "users", "experts": "experts"}
    metrics = [("median_ms", "time of one layer call (ms)", "")]
    if result["device"]["type"] == "cuda":
        metrics.append(("peak_mib", "peak memory (MiB)", "-memory"))
    for metric, ylabel, suffix in metrics:
        for sweep, key in xkey.items():
            if suffix and sweep != "tokens":
                continue
            rows = [r for r in result["rows"] if r["level"] == "op" and r["sweep"] == sweep]
            if not rows:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for variant in dict.fromkeys(r["variant"] for r in rows):
                pts = sorted((r["shape"][key], r[metric]) for r in rows if r["variant"] == variant
                             and r[metric] is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel({"tokens": "tokens in the batch", "users": "distinct users in the batch",
                           "experts": "experts"}[sweep])
            ax.set_ylabel(ylabel)
            ax.set_title(f"{result['device']['name'][:48]}, {rows[0]['dtype']}")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = stem.parent / f"{stem.name}-{sweep}{suffix}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


def measure_auto_table(dev: torch.device, quick: bool, log: Callable[[str], None] = print) -> list:
    """Time each backend per phase and write the auto table the dispatcher reads for this GPU
    (proper_kernels.auto_table)."""
    from proper_kernels import auto_table

    rows = auto_table.measure(dev, quick=quick)
    target = auto_table.write_measured(torch.cuda.get_device_name(dev), rows)
    for r in rows:
        log(f"auto table: {r.phase}: {r.backend} ({r.reason})")
    log(f"auto table written to {target}")
    return rows


def run(device: str = "cpu", quick: bool = False, out: Optional[Path] = None, repeats: Optional[int] = None,
        compile: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run the suite; returns the result dict (also written as JSON, markdown and PNGs)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device is available (use --device cpu)")
        dev = torch.device("cuda", torch.cuda.current_device())
    dtype_name = "bf16" if dev.type == "cuda" else "fp32"
    dtype = DTYPES[dtype_name]
    rounds = repeats or ((7 if quick else 25) if dev.type == "cpu" else 20)
    compile_ok, compile_note = (_compile_works(dev, log) if compile else (False, "--no-compile"))
    now = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.time()
    name = device_name(dev)
    log(f"proper bench on {name}, {dtype_name}, {'quick' if quick else 'full'}, {rounds} rounds")
    peaks = measure_peaks(dev, dtype, quick)
    auto_rows = []
    if dev.type == "cuda":  # first, so that the "proper" rows below run on the measured choice
        auto_rows = [vars(r) for r in measure_auto_table(dev, quick, log)]
    rows = run_op(dev, dtype, dtype_name, quick, rounds, compile_ok, log)
    rows += run_block(dev, dtype, dtype_name, quick, rounds, log)
    model_rows, summary = run_model(dev, dtype, dtype_name, quick, rounds, compile_ok, log)
    rows += model_rows
    rows += run_train(dev, dtype, dtype_name, quick, rounds, log)
    rows += run_generate(dev, dtype, dtype_name, quick, rounds, log)
    by = {(r["sweep"], r["variant"]): r["median_ms"] for r in rows if r["level"] == "model"}
    summary["train_step_ms"] = {v: by[("train", v)] for v in ("lora", "proper", "peft-moe")}
    summary["train_proper_over_lora"] = by[("train", "proper")] / by[("train", "lora")]
    summary["train_peft_moe_over_proper"] = by[("train", "peft-moe")] / by[("train", "proper")]
    summary["generate_tokens_per_s"] = {r["variant"]: r["tokens_per_s"] for r in rows
                                        if r["level"] == "model" and r["sweep"] == "generate"}
    g = summary["generate_tokens_per_s"]
    summary["generate_proper_over_peft_mixed"] = g["proper"] / g["peft-mixed"]
    result = {
        "schema": SCHEMA, "date": now.date().isoformat(), "timestamp_utc": now.isoformat(timespec="seconds"),
        "device": {"type": dev.type, "name": name}, "versions": versions(), "peaks": peaks,
        "settings": {"quick": quick, "rounds": rounds, "dtype": dtype_name, "compile": compile_ok,
                     "compile_note": compile_note,
                     "timer": ("CUDA events via triton.testing.do_bench (warm-up, L2 flushed), median/p20/p80"
                               if dev.type == "cuda" else
                               "time.perf_counter, variants interleaved per round after 2 warm-up rounds, "
                               "median/p20/p80"),
                     "threads": torch.get_num_threads()},
        "summary": summary, "rows": rows, "auto_table": auto_rows, "seconds": None,
    }
    result["seconds"] = time.time() - t0
    out_dir = Path(out) if out is not None else Path("benchmarks") / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{_slug(dev.type if dev.type == 'cpu' else name)}-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    result["files"] = [str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))] + [
        str(p) for p in plots(result, stem)]
    log(f"wrote {', '.join(result['files'])} in {result['seconds']:.0f} s")
    return result


def _compile_works(device: torch.device, log) -> tuple[bool, Optional[str]]:
    """Whether torch.compile works here (a C++ compiler on the CPU, Triton on a GPU): the
    proper-compile rows are left out, with the reason in the settings, when it does not."""
    try:
        f = torch.compile(lambda a: torch.relu(a) * 2.0, dynamic=False)
        f(torch.randn(8, device=device))
        return True, None
    except Exception as e:  # noqa: BLE001 - any toolchain failure means: no compile rows
        note = f"torch.compile unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        log(note)
        return False, note


def main(argv: Optional[Sequence[str]] = None) -> int:
    if argv is not None and "--plan" in argv:  # the launch plan with its cost: no GPU, no timing
        from proper_kernels.cost import main as plan_main

        try:
            return plan_main(list(argv))
        except SystemExit as e:
            return int(e.code or 0)
    p = argparse.ArgumentParser(prog="proper bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer, smaller cases and rounds")
    p.add_argument("--out", type=Path, default=None, help="output directory (default benchmarks/results)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per case")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--plan", action="store_true",
                   help="print the Triton launch plan of the goal cases with bytes, FLOPs and predicted H100 "
                        "time (proper bench --plan --help), instead of timing")
    p.add_argument("--table", action="store_true",
                   help="only measure the backend table that backend='auto' reads on this GPU, and write it")
    args = p.parse_args(argv)
    try:
        if args.table:
            if args.device != "cuda" or not torch.cuda.is_available():
                raise RuntimeError("--table measures the GPU backends: it needs --device cuda and a CUDA device")
            measure_auto_table(torch.device("cuda", torch.cuda.current_device()), args.quick)
            return 0
        run(args.device, args.quick, args.out, args.repeats, compile=not args.no_compile)
    except RuntimeError as e:
        print(f"proper bench: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
