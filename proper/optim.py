"""LazyAdamW: AdamW whose state for row-sparse gradients is kept only for the rows seen.

A user bank of a million users (``ProperConfig(sparse_user_grad=True)``) gets gradients over
the users of the batch only, as sparse tensors. ``torch.optim.AdamW`` refuses them and
``torch.optim.SparseAdam`` allocates its moments for the whole table; LazyAdamW allocates
them row by row, the first time a row has a gradient:

  state per sparse parameter: ``slot`` [rows] int64 (-1: never seen), and per seen row its
  ``exp_avg`` / ``exp_avg_sq`` (grown by doubling) and its own ``step`` count.

A row is updated only in the steps where it has a gradient (the "lazy" Adam of TF's
LazyAdam and torch's SparseAdam: its moments do not decay in between), with bias correction
by its own step count and decoupled weight decay on that row. Dense gradients get exactly
torch.optim.AdamW's update. Memory: 2 x (rows seen) x (row size) for a sparse parameter,
plus 8 bytes per row for the slot map.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor


_INT_STATE = ("slot", "seen", "row_step")


class LazyAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating-point-param state to the parameter's dtype on load; the row
        # bookkeeping is integer and must stay exact (a bf16 slot map would corrupt it)
        ints: dict = {}
        rest = {"param_groups": state_dict["param_groups"], "state": {}}
        for idx, st in state_dict["state"].items():
            ints[idx] = {k: v for k, v in st.items() if k in _INT_STATE}
            rest["state"][idx] = {k: v for k, v in st.items() if k not in _INT_STATE}
        super().load_state_dict(rest)
        params = [p for group in self.param_groups for p in group["params"]]
        for idx, st in ints.items():
            p = params[int(idx)]
            self.state[p].update({k: torch.as_tensor(v).to(device=p.device, dtype=torch.long) for k, v in st.items()})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    self._sparse_step(p, group)
                else:
                    self._dense_step(p, group)
        return loss

    def _dense_step(self, p: Tensor, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = float(state["step"])
        g = p.grad
        p.mul_(1.0 - lr * wd)
        state["exp_avg"].lerp_(g, 1.0 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1.0 - b2 ** t)).add_(eps)  # as torch's AdamW
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1.0 - b1 ** t))

    def _sparse_step(self, p: Tensor, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        grad = p.grad.coalesce()
        rows = grad.indices()[0]
        if rows.numel() == 0:
            return
        g = grad.values().reshape((rows.numel(),) + tuple(p.shape[1:]))
        state = self.state[p]
        if "slot" not in state:
            state["slot"] = torch.full((p.shape[0],), -1, dtype=torch.long, device=p.device)
            state["seen"] = torch.zeros((), dtype=torch.long)
            state["exp_avg"] = p.new_zeros((0,) + tuple(p.shape[1:]))
            state["exp_avg_sq"] = p.new_zeros((0,) + tuple(p.shape[1:]))
            state["row_step"] = torch.zeros(0, dtype=torch.long, device=p.device)
        slot = state["slot"]
        new = rows[slot[rows] < 0]
        if new.numel():
            seen = int(state["seen"])
            need = seen + new.numel()
            cap = state["exp_avg"].shape[0]
            if need > cap:  # grow the row tables by doubling
                cap = max(need, 2 * cap, 16)
                for key in ("exp_avg", "exp_avg_sq", "row_step"):
                    old = state[key]
                    grown = old.new_zeros((cap,) + tuple(old.shape[1:]))
                    grown[: old.shape[0]] = old
                    state[key] = grown
            slot[new] = torch.arange(seen, need, device=p.device)
            state["seen"] = torch.tensor(need)
        s = slot[rows]
        m, v, steps = state["exp_avg"], state["exp_avg_sq"], state["row_step"]
        steps[s] += 1
        t = steps[s].reshape((-1,) + (1,) * (g.dim() - 1)).to(torch.float64)
        m_s = m[s].lerp_(g, 1.0 - b1)
        v_s = v[s].mul_(b2).addcmul_(g, g, value=1.0 - b2)
        m[s], v[s] = m_s, v_s
        bc1 = (1.0 - b1 ** t).to(g.dtype)
        bc2_sqrt = (1.0 - b2 ** t).sqrt().to(g.dtype)
        denom = (v_s.sqrt() / bc2_sqrt).add_(eps)
        rows_p = p[rows]
        rows_p.mul_(1.0 - lr * wd).addcdiv_(m_s, denom * bc1, value=-lr)
        p[rows] = rows_p

    def rows_with_state(self, p: Tensor) -> int:
        """How many rows of a sparse-gradient parameter have optimizer state."""
        st = self.state.get(p, {})
        return int(st["seen"]) if "seen" in st else 0


__all__ = ["LazyAdamW"]
