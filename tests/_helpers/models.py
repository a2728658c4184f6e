"""Tiny random Hugging Face models built from configs (no download), the model families the
patching tests run over (ModelSpec), the PROPER configs used on them, and what the tests do
with such a model (a batch, its output and loss, its adapters, its state).

Every builder seeds torch itself, so two calls with the same seed give identical models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

import proper

VOCAB = 64
HIDDEN = 32
NUM_USERS = 6
BATCH_IDS = [0, 5, -1, 2]  # mixed users, one without a row; users 1, 3, 4 are not in the batch


def _tiny_decoder(family: str, seed: int, layers: int = 2, **config) -> nn.Module:
    """A tiny Llama-shaped causal LM of `family` ("Llama", "Qwen2", "Mistral"); `config`
    overrides fields of its config."""
    import transformers

    cfg = getattr(transformers, f"{family}Config")(**{
        **dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               attn_implementation="eager"),
        **config,
    })
    torch.manual_seed(seed)
    return getattr(transformers, f"{family}ForCausalLM")(cfg)


def tiny_llama(seed: int = 0, layers: int = 2, **config) -> nn.Module:
    """The tiny Llama of every test that needs one: `layers` decoder layers, `config`
    overriding fields of its LlamaConfig."""
    return _tiny_decoder("Llama", seed, layers, **config)


def tiny_qwen2(seed: int = 0) -> nn.Module:
    return _tiny_decoder("Qwen2", seed)


def tiny_mistral(seed: int = 0) -> nn.Module:
    return _tiny_decoder("Mistral", seed)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return BertModel(cfg)


@dataclass(frozen=True)
class ModelSpec:
    """A tiny model family: how to build it, what to patch, and what can't be patched."""

    name: str
    build: Callable[..., nn.Module]
    targets: tuple[str, ...]
    not_linear: str  # a module name that matches a non-linear module (must raise TypeError)

    def __repr__(self) -> str:  # readable pytest ids
        return self.name


LLAMA = ModelSpec("llama", tiny_llama, ("gate_proj", "up_proj", "down_proj"), "mlp")
QWEN2 = ModelSpec("qwen2", tiny_qwen2, ("gate_proj", "up_proj", "down_proj"), "mlp")
GPT2 = ModelSpec("gpt2", tiny_gpt2, ("c_fc", "c_proj"), "mlp")
BERT = ModelSpec("bert", tiny_bert, ("intermediate.dense", "output.dense"), "intermediate")
MISTRAL = ModelSpec("mistral", tiny_mistral, ("gate_proj", "up_proj", "down_proj"), "mlp")
ALL_MODELS = [LLAMA, QWEN2, MISTRAL, GPT2, BERT]


def full_config(targets, **over) -> proper.ProperConfig:
    """Experts + user bank + all three routers, no dropout (the acceptance configuration)."""
    kw = dict(
        num_experts=4, top_k=2, rank=4, alpha=8.0, user_rank=3, user_alpha=6.0,
        num_users=NUM_USERS, router=("token", "user", "lora"), dropout=0.0,
        target_modules=list(targets),
    )
    kw.update(over)
    return proper.ProperConfig(**kw)


def population_config(targets, **over) -> proper.ProperConfig:
    """Stage 1: one expert, no router, no user bank (the only mergeable configuration)."""
    kw = dict(num_experts=1, top_k=1, rank=4, alpha=8.0, num_users=0, router=(), dropout=0.0,
              target_modules=list(targets))
    kw.update(over)
    return proper.ProperConfig(**kw)


def make_batch(batch: int = len(BATCH_IDS), seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def output_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The main output tensor: logits for an LM, last_hidden_state for an encoder."""
    out = model(input_ids=input_ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def loss_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """A language-model loss for causal LMs; for an encoder, MSE of the last hidden state
    against a fixed random target (its mean alone would be ~0 after the final LayerNorm)."""
    out = model(input_ids=input_ids, labels=input_ids) if hasattr(model, "lm_head") else model(input_ids=input_ids)
    if getattr(out, "loss", None) is not None:
        return out.loss
    h = out.last_hidden_state
    target = torch.randn(h.shape, generator=torch.Generator().manual_seed(7))
    return (h - target).pow(2).mean()


def adapter_names(model: nn.Module) -> set[str]:
    """Full parameter names (as model.named_parameters gives them) of every adapter tensor."""
    return {f"{layer}.{p}" for layer, l in proper.proper_layers(model).items() for p in l.adapter_parameters()}


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 123, std: float = 0.3) -> None:
    """Fill every adapter tensor with random values, so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    for layer in proper.proper_layers(model).values():
        for p in layer.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"tensors changed: {changed}"
