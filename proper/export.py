"""Export one user's whole adapter as a plain PEFT LoRA.

For user u, each ProperLinear adds  s_g * sum_e g_e B_e A_e x + s_u B^u A^u x. When the
gates do not depend on the token (one expert, or a router made of the user-aware table
only) this is one fixed low-rank update, written exactly as a LoRA of rank k*r + r_u:

    A = [g_1 A_e1; ...; g_k A_ek; A^u]        B = [B_e1, ..., B_ek, (s_u / s_g) B^u]

with PEFT's scaling lora_alpha / r = s_g. The directory is made by peft itself
(``get_peft_model`` + ``save_pretrained``), so ``PeftModel.from_pretrained`` loads it.
With a token router or the LoRA-aware router the gates change from token to token and no
exact LoRA exists: export refuses, saying so.

Stages 2 and 3 train on a base with stage 1's population LoRA merged into its weights, but
adapter_config.json names the original model, onto which peft loads the adapter. So the
LoRAs that :func:`proper.merge` folded in (``proper.patching.merged_loras``) are folded
back in here, as more rank: [A; A_1] and [B, (s_1 / s_g) B_1]. Every module gets the same
rank (zero blocks where a part is missing), and the export onto the original model gives
the patched model's outputs.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from proper_kernels import reference

from .layer import ProperLinear, is_conv1d
from .patching import _patch_of, merged_loras, unpatch


def _user_gates(layer: ProperLinear, user: int) -> tuple[Tensor, Tensor]:
    """(gates [k], experts [k]) of a user whose routing depends on the user alone."""
    E = layer.num_experts
    if layer.router_user is not None:
        logits = layer.router_user[user if user >= 0 else layer.router_user.shape[0] - 1][None].float()
    else:
        logits = torch.zeros(1, E, device=layer.lora_A.device)
    gates, idx = reference.router_topk(logits, layer.top_k, layer.temperature)
    return gates[0], idx[0]


def inexact_reason(config) -> Optional[str]:
    """Why adapters of this ProperConfig have no exact PEFT LoRA, or None when they have one."""
    token = [r for r in config.router if r in ("token", "lora")]
    if config.num_experts > 1 and token:
        names = {"token": "token router (W_x x)", "lora": "LoRA-aware router (W_h h_u)"}
        return (f"its {' and '.join(names[r] for r in token)} give{'s' if len(token) == 1 else ''} gates that "
                "depend on the token, so no LoRA reproduces a user's adapter exactly")
    return None


@torch.no_grad()
def user_lora(layer: ProperLinear, user: int) -> tuple[Tensor, Tensor]:
    """(A [k*r + r_u, in], B [out, k*r + r_u]) of `user` for this layer, in PEFT's layout,
    to be scaled by s_g."""
    g, idx = _user_gates(layer, user)
    A_parts = [layer.lora_A[e].float() * gk for gk, e in zip(g.tolist(), idx.tolist())]
    B_parts = [layer.lora_B[e].float() for e in idx.tolist()]
    if layer.user_A is not None:
        ratio = layer.user_scaling / layer.scaling
        if user >= 0:
            A_parts.append(layer.user_A[user].float())
            B_parts.append(layer.user_B[user].float() * ratio)
        else:  # a user without a row: a zero block keeps the rank the same for every user
            A_parts.append(torch.zeros_like(layer.user_A[0], dtype=torch.float32))
            B_parts.append(torch.zeros_like(layer.user_B[0], dtype=torch.float32))
    return torch.cat(A_parts, 0), torch.cat(B_parts, 1)


def export_peft(model: nn.Module, user: int, path: Union[str, os.PathLike]) -> Path:
    """Write `user`'s adapter (bank row, or -1 for a user without a row) of a patched
    model as a PEFT LoRA directory, exact on the model before any :func:`proper.merge`;
    returns the path. The model is not changed."""
    from peft import LoraConfig, get_peft_model

    patch = _patch_of(model)
    cfg = patch.config
    if not isinstance(user, int) or isinstance(user, bool) or not -1 <= user < max(cfg.num_users, 0):
        raise ValueError(f"user must be a bank row in [-1, {cfg.num_users}), got {user!r}")
    reason = inexact_reason(cfg)
    if reason is not None:
        raise ValueError(f"no exact PEFT LoRA for this model (router {cfg.router}): {reason}; export needs one "
                         "expert or router=('user',)")
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {name: [user_lora(layer, user)] for name, layer in
                                                      patch.layers.items()}
    for folded in merged_loras(model):  # back onto the original weights: the merged LoRAs as more rank
        for name, (A, B, scaling) in folded.items():
            parts.setdefault(name, []).append((A, B * (scaling / cfg.scaling)))
    rank = max(sum(A.shape[0] for A, _ in p) for p in parts.values())
    base = unpatch(copy.deepcopy(model))  # a plain copy of the base model; `model` stays patched
    conv1d = any(is_conv1d(base.get_submodule(n)) for n in parts)
    lcfg = LoraConfig(r=rank, lora_alpha=cfg.scaling * rank, lora_dropout=cfg.dropout,
                      target_modules=sorted(parts), fan_in_fan_out=conv1d, init_lora_weights=False)
    peft_model = get_peft_model(base, lcfg)
    for name, p in parts.items():
        A = torch.cat([a.float().cpu() for a, _ in p], 0)
        B = torch.cat([b.float().cpu() for _, b in p], 1)
        pad = rank - A.shape[0]  # a module with fewer parts: zero blocks keep one rank for all
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])], 0)
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], 1)
        target = peft_model.base_model.model.get_submodule(name)
        target.lora_A["default"].weight.data.copy_(A)
        target.lora_B["default"].weight.data.copy_(B)
    path = Path(path)
    peft_model.save_pretrained(str(path))
    return path
