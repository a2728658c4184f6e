"""The baselines every level is measured against, built the way users write them today.

- the floor: the frozen layer (or model) alone, no adapters;
- ``peft``'s mixed batch: one LoRA adapter per user, ``adapter_names=`` (model level);
- :class:`PeftStyleLayer`: a PEFT-style mixture of LoRA experts on one linear layer, with
  the per-user LoRAs handled like ``peft``'s mixed batch. It is the ``peft-moe`` variant
  of the op level (copied from a ProperLinear, so it computes the same function) and of
  the training step (fresh adapters on every target of a model).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor


def _linear_from(weight: Tensor) -> nn.Linear:
    """An nn.Linear (no bias) holding its own copy of `weight` [out, in], as peft's lora_A/B."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone())
    return lin


class PeftStyleLayer(nn.Module):
    """A mixture of LoRA experts written as with peft: one module per expert and per user,
    Python loops.

    Users: ``peft``'s mixed-batch steps (for each user present, the rows of its sequences,
    ``B_u(A_u x) * s_u`` added into the base output); every user's LoRA is held, as peft
    keeps every adapter loaded. Router: token logits (+ the user's row, + the LoRA-aware
    term on the user LoRA's hidden ``A_u x`` when present), softmax, top-k, renormalised.
    Experts: the Mixtral / LoRAMoE loop (per expert, the tokens routed to it by ``nonzero``,
    ``B_e(A_e x) * gate * s`` by ``index_add``).

    ``forward(x, ids, ids_host)``: one user id per sequence, on the device and as a host
    list (peft's adapter names are a Python list). Without ids, ``state["ids"]`` is read
    (a shared dict, for a layer patched into a model).
    """

    def __init__(self, base: nn.Module, experts_A: Sequence[Tensor], experts_B: Sequence[Tensor], scaling: float,
                 top_k: int, router_x: Tensor, router_user: Optional[Tensor] = None,
                 router_h: Optional[Tensor] = None, user_A: Optional[Tensor] = None,
                 user_B: Optional[Tensor] = None, user_scaling: float = 0.0, temperature: float = 1.0,
                 state: Optional[dict] = None) -> None:
        super().__init__()
        self.base, self.state = base, state
        self.top_k, self.temperature, self.scaling, self.user_scaling = top_k, temperature, scaling, user_scaling
        self.experts_A = nn.ModuleList(_linear_from(a) for a in experts_A)
        self.experts_B = nn.ModuleList(_linear_from(b) for b in experts_B)
        self.router_x = _linear_from(router_x)
        self.router_user = None
        if router_user is not None:  # num_users + 1 rows: the last one for ids < 0
            self.router_user = nn.Embedding(router_user.shape[0], router_user.shape[1], device="meta")
            self.router_user.weight = nn.Parameter(router_user.detach().clone())
        self.router_h = _linear_from(router_h) if router_h is not None else None
        self.user_A = self.user_B = None
        if user_A is not None:
            self.user_A = nn.ModuleDict({str(u): _linear_from(user_A[u]) for u in range(user_A.shape[0])})
            self.user_B = nn.ModuleDict({str(u): _linear_from(user_B[u]) for u in range(user_B.shape[0])})
        self.user_rank = 0 if user_A is None else user_A.shape[1]
        self.last_indices: Optional[Tensor] = None

    @classmethod
    def from_proper(cls, layer) -> "PeftStyleLayer":
        """The same function as a ProperLinear `layer` (its tensors copied; the base shared)."""
        E = layer.num_experts
        return cls(layer.base, [layer.lora_A[e] for e in range(E)], [layer.lora_B[e] for e in range(E)],
                   layer.scaling, layer.top_k, layer.router_x, layer.router_user, layer.router_h, layer.user_A,
                   layer.user_B, layer.user_scaling, layer.temperature)

    @classmethod
    def fresh(cls, base: nn.Linear, experts: int, top_k: int, rank: int, num_users: int, state: dict,
              scaling: float = 2.0) -> "PeftStyleLayer":
        """New trainable experts and token + user routers around a frozen `base` (no user LoRA)."""
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        d_in, d_out = base.in_features, base.out_features
        A = [torch.randn(rank, d_in, **kw) * d_in ** -0.5 for _ in range(experts)]
        B = [torch.randn(d_out, rank, **kw) * 0.01 for _ in range(experts)]
        router_x = torch.randn(experts, d_in, **kw) * d_in ** -0.5
        router_user = torch.randn(num_users + 1, experts, **kw)
        return cls(base, A, B, scaling, top_k, router_x, router_user, state=state)

    def forward(self, x: Tensor, ids: Optional[Tensor] = None, ids_host: Optional[list] = None) -> Tensor:
        if ids is None:
            ids = self.state["ids"]
        lead, d_in = x.shape[:-1], x.shape[-1]
        xt = x.reshape(-1, d_in)
        T = xt.shape[0]
        per_seq = T // ids.shape[0]
        result = self.base(x)
        h_u = None
        if self.user_A is not None:  # peft's mixed batch: one sub-batch per user present
            if ids_host is None:
                ids_host = ids.tolist()
            xs = x.reshape(ids.shape[0], per_seq, d_in)
            res = result.reshape(ids.shape[0], per_seq, -1)
            if self.router_h is not None:
                h_u = x.new_zeros(ids.shape[0], per_seq, self.user_rank)
            for u in sorted(set(ids_host)):
                if u < 0:
                    continue
                rows = [i for i, v in enumerate(ids_host) if v == u]
                hu = self.user_A[str(u)](xs[rows])
                if h_u is not None:
                    h_u[rows] = hu
                res[rows] += self.user_B[str(u)](hu) * self.user_scaling
        logits = self.router_x(xt)
        if self.router_user is not None:
            rows_t = ids.repeat_interleave(per_seq)
            rows_t = torch.where(rows_t >= 0, rows_t, torch.full_like(rows_t, self.router_user.num_embeddings - 1))
            logits = logits + self.router_user(rows_t)
        if h_u is not None:
            logits = logits + self.router_h(h_u.reshape(T, -1))
        wide = torch.promote_types(logits.dtype, torch.float32)
        probs = torch.softmax(logits.to(wide) / self.temperature, dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = (top_p / top_p.sum(dim=-1, keepdim=True)).to(x.dtype)
        self.last_indices = top_i.detach()
        out = result.reshape(T, -1)
        for e in range(len(self.experts_A)):  # the expert loop
            tok, slot = torch.nonzero(top_i == e, as_tuple=True)
            if tok.numel() == 0:
                continue
            ye = self.experts_B[e](self.experts_A[e](xt[tok]))
            out.index_add_(0, tok, ye * (gates[tok, slot].unsqueeze(-1) * self.scaling))
        return out.reshape(*lead, -1)

    def adapter_grads(self) -> dict[str, Optional[Tensor]]:
        """The gradients laid out as ProperLinear's parameters (zeros for unused modules)."""

        def stack(mods) -> Optional[Tensor]:
            if mods is None:
                return None
            return torch.stack([m.weight.grad if m.weight.grad is not None else torch.zeros_like(m.weight)
                                for m in mods])

        grad = lambda m: None if m is None else m.weight.grad  # noqa: E731
        return {"lora_A": stack(self.experts_A), "lora_B": stack(self.experts_B), "router_x": grad(self.router_x),
                "router_user": grad(self.router_user), "router_h": grad(self.router_h),
                "user_A": stack(None if self.user_A is None else self.user_A.values()),
                "user_B": stack(None if self.user_B is None else self.user_B.values())}


def patch_peft_style(model: nn.Module, targets: Sequence[str], experts: int, top_k: int, rank: int,
                     num_users: int, state: dict) -> nn.Module:
    """Freeze `model` and put a fresh PeftStyleLayer on every nn.Linear named by `targets`."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if name.endswith(tuple(targets)) and isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    PeftStyleLayer.fresh(module, experts, top_k, rank, num_users, state))
    return model


def peft_mixed(model: nn.Module, lora_config, names: Sequence[str]) -> nn.Module:
    """``peft`` with one LoRA adapter per name (called with ``adapter_names=`` per sequence)."""
    import peft

    mixed = peft.get_peft_model(model, lora_config, adapter_name=names[0])
    for n in names[1:]:
        mixed.add_adapter(n, lora_config)
    return mixed
