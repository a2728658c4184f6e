"""Host-side pieces shared by the Triton and CUDA backends' autograd: per-token user ids
and the gradients that are plain GEMMs or scatters over tokens (routers, user bank)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def token_user_ids(user_ids: Optional[Tensor], lead_shape: torch.Size, device: torch.device) -> Tensor:
    """One int64 id per token (-1: no row), from per-token or per-sequence ids."""
    T = 1
    for s in lead_shape:
        T *= s
    if user_ids is None:
        return torch.full((T,), -1, dtype=torch.long, device=device)
    if user_ids.shape == lead_shape:
        return user_ids.reshape(-1).contiguous()
    return user_ids.reshape((-1,) + (1,) * (len(lead_shape) - 1)).expand(lead_shape).reshape(-1).contiguous()


def bank_grad(left: Tensor, right: Tensor, uid: Tensor, groups: Optional[int], n_users: int) -> Tensor:
    """sum over the tokens of each user of left_t^T right_t: [N, left cols, right cols].

    Tokens come in `groups` runs of one user each (sequences); without groups, every token is
    its own run and the outer products are summed in chunks to bound memory. Tokens without
    a row (id -1) add zeros to row 0: no boolean indexing, so no host sync."""
    out = torch.zeros(n_users, left.shape[1], right.shape[1], device=left.device, dtype=torch.float32)
    if left.shape[0] == 0:  # no tokens (and, per sequence, no groups to split them into)
        return out
    if groups is not None:
        # One batched GEMM in the data's dtype (cuBLAS accumulates in fp32): the [T, in] side is
        # read once, with no fp32 copy of it.
        L = left.shape[0] // groups
        rows = uid.reshape(groups, L)[:, 0]
        dt = right.dtype if right.dtype != torch.float32 else left.dtype
        per = torch.bmm(left.to(dt).reshape(groups, L, -1).transpose(1, 2), right.to(dt).reshape(groups, L, -1))
        per = per.float() * (rows >= 0).to(torch.float32)[:, None, None]
        return out.index_add_(0, rows.clamp(min=0), per)
    chunk = max(1, (1 << 24) // max(1, left.shape[1] * right.shape[1]))
    for i in range(0, left.shape[0], chunk):
        u = uid[i : i + chunk]
        lw = left[i : i + chunk].float() * (u >= 0).to(torch.float32)[:, None]
        outer = lw[:, :, None] * right[i : i + chunk].float()[:, None, :]
        out.index_add_(0, u.clamp(min=0), outer)
    return out


def router_and_bank_grads(dlogits, dhu, dy2, x2, xl2, hu, uid, groups, router_x, router_user, router_h,
                          user_A, user_B, user_scaling, needs) -> dict[str, Tensor]:
    """Gradients of the routers and of the user bank rows, from d logits [T, E] and
    d h_u [T, r_u] (fp32), as GEMMs and scatters over the T tokens."""
    grads: dict[str, Tensor] = {}
    has_u = user_A is not None and user_A.shape[1] > 0
    if router_x is not None and needs["router_x"]:  # in x's dtype: no fp32 copy of x
        grads["router_x"] = (dlogits.to(x2.dtype).t() @ x2).to(router_x.dtype)
    if router_user is not None and needs["router_user"]:
        rows = torch.where(uid >= 0, uid, router_user.shape[0] - 1)
        table = torch.zeros(router_user.shape, device=dlogits.device, dtype=torch.float32)
        grads["router_user"] = table.index_add_(0, rows, dlogits).to(router_user.dtype)
    if router_h is not None and has_u and needs["router_h"]:
        grads["router_h"] = (dlogits.t() @ hu).to(router_h.dtype)
    if has_u and needs["user_A"]:
        grads["user_A"] = bank_grad(dhu, xl2, uid, groups, user_A.shape[0]).to(user_A.dtype)
    if has_u and needs["user_B"]:
        grads["user_B"] = (bank_grad(dy2, hu, uid, groups, user_B.shape[0]) * user_scaling).to(user_B.dtype)
    return grads
