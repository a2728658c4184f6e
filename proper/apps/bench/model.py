"""The block and model levels: one Llama decoder layer and a whole Llama (4 layers of 256 on
the CPU, a ~1.1B config on a GPU without --quick): the forward of a 64-user mixed batch, a
training step and batched generation, against the floor (the model alone) and peft.

Forward and generation variants: ``base`` (no adapters), ``peft-shared`` (one LoRA for every
sequence: what a plain LoRA costs), ``peft-mixed`` (one peft adapter per user,
``adapter_names=``), ``proper`` (the user bank) and ``proper-compile``. Training step:
``lora`` (peft), ``proper`` (group experts, token + user-aware routers) and ``peft-moe``
(baselines.PeftStyleLayer on the same targets).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .baselines import patch_peft_style, peft_mixed
from .schema import make_row
from .timing import describe_overhead, paired_overhead, peak_mib, resolved_at_noise, time_interleaved


def _row(level, sweep, case, variant, device, dtype_name, shape, backend, mode, t, peak, flops, nbytes,
         tokens) -> dict:
    return make_row(level, sweep, case, variant, device, dtype_name, shape, backend, mode, t, peak=peak, flops=flops,
                    nbytes=nbytes, tokens=tokens, input_sets=1)


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
    mixed = peft_mixed(fresh(), lcfg, names).eval()
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


def train_models(mc: ModelCase, device, dtype) -> dict[str, tuple[nn.Module, Callable]]:
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
    moe = patch_peft_style(fresh(), mc.targets, mc.experts, 2, mc.rank, mc.users, {"ids": users})
    out["peft-moe"] = (moe, lambda ids: moe(input_ids=ids, labels=ids).loss)
    return out


def run_train(device, dtype, dtype_name: str, quick: bool, rounds: int, log) -> list[dict]:
    mc = model_case(device, quick)
    models = train_models(mc, device, dtype)
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
