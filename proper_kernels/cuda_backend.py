"""The `cuda` backend: the CUDA C++ ops of csrc/ (torch.ops.proper.*) composed into
proper_linear and router_topk with autograd.

Decode (few tokens, no adapter dropout): ONE fused kernel per layer call
(proper_decode, BGMV-style: each token's chosen experts and user row are read once).
Prefill and training: the shrink/expand halves, forward and backward:
  logits  = x W_x^T + R[u] + h_u W_h^T     (cuBLAS GEMMs; h_u by bgmv_shrink)
  gates   = router_topk(logits)             (one warp per token)
  h       = bgmv_shrink(x, A, idx)          (the k chosen experts of each token)
  y       = bgmv_expand(h, B, idx, g s_g, base) + bgmv_expand(h_u, B^u, u, s_u)
  backward: d(g h) = bgmv_shrink(dy, B, idx, transpose), dx = bgmv_expand(dh, A, idx,
  transpose), router_topk_backward; weight gradients as dense GEMMs over tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import router_and_bank_grads, token_user_ids
from .reference import Routing

# Up to this many tokens (with no adapter dropout) the forward is the fused decode kernel.
DECODE_MAX_TOKENS = 256

_ops = None


def load() -> Optional[str]:
    """Load the extension; None when it is there, else why not."""
    global _ops
    import importlib.util

    if importlib.util.find_spec("proper_kernels._C") is None:
        return ("the CUDA extension proper_kernels._C is not built (build it with "
                "`PROPER_BUILD_CUDA=1 pip install --no-build-isolation -v -e .`)")
    try:
        import proper_kernels._C  # noqa: F401  (registers torch.ops.proper.*)
    except (ImportError, OSError) as e:
        return f"the CUDA extension proper_kernels._C failed to load: {e}"
    _ops = torch.ops.proper
    return None


def router_topk(logits: Tensor, top_k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    return _RouterTopK.apply(logits.contiguous(), int(top_k), float(temperature))


class _RouterTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, top_k, temperature):
        gates, idx = _ops.router_topk(logits, top_k, temperature)
        ctx.save_for_backward(logits, idx)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(idx)
        return gates, idx

    @staticmethod
    def backward(ctx, dgates, _didx):
        logits, idx = ctx.saved_tensors
        dlogits = _ops.router_topk_backward(logits, idx, dgates.to(logits.dtype).contiguous(), ctx.temperature)
        return dlogits, None, None


def _dense_slots(v: Tensor, idx: Tensor, E: int) -> Tensor:
    """[T, k, r] values of the chosen experts -> [T, E * r] with zeros elsewhere."""
    T, k, r = v.shape
    out = torch.zeros(T, E, r, device=v.device, dtype=torch.float32)
    out.scatter_(1, idx[:, :, None].expand(T, k, r), v)
    return out.reshape(T, E * r)


class _ProperLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_lora, base_out, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
                uid, groups, scaling, top_k, temperature, user_scaling, same_x):
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in).contiguous()
        xl2 = x2 if same_x else x_lora.reshape(-1, d_in).contiguous()
        base2 = base_out.reshape(-1, base_out.shape[-1]).contiguous()
        A, B = lora_A.contiguous(), lora_B.contiguous()
        has_u = user_A is not None
        UA = user_A.contiguous() if has_u else None
        UB = user_B.contiguous() if has_u else None
        T, E = x2.shape[0], A.shape[0]
        if same_x and T <= DECODE_MAX_TOKENS:
            y, logits, gates, idx, h, hu = _ops.proper_decode(
                x2, base2, A, B, router_x, router_user, router_h, UA, UB, uid, scaling, top_k, temperature,
                user_scaling, False,
            )
        else:
            logits = torch.zeros(T, E, device=x.device, dtype=torch.float32)
            if router_x is not None:  # in fp32, so that 16-bit rounding cannot reorder the experts
                logits += x2.float() @ router_x.float().t()
            if router_user is not None:
                logits += router_user[torch.where(uid >= 0, uid, router_user.shape[0] - 1)].float()
            if has_u:
                hu = _ops.bgmv_shrink(xl2, UA, uid[:, None], False, False)[:, 0]
                if router_h is not None:
                    logits += hu @ router_h.float().t()
            else:
                hu = torch.zeros(T, 0, device=x.device, dtype=torch.float32)
            gates, idx = _ops.router_topk(logits, top_k, temperature)
            h = _ops.bgmv_shrink(xl2, A, idx, False, False)
            y = _ops.bgmv_expand(h, B, idx, gates * scaling, base2.float(), False, False)
            if has_u:
                ones = torch.full((T, 1), user_scaling, device=x.device, dtype=torch.float32)
                y = _ops.bgmv_expand(hu[:, None].contiguous(), UB, uid[:, None], ones, y, False, False)
            y = y.to(base_out.dtype)
        ctx.save_for_backward(x2, xl2 if not same_x else None, uid, A, B, router_x, router_user, router_h, UA, UB,
                              logits, gates, idx, h, hu)
        ctx.consts = (groups, scaling, temperature, user_scaling, same_x, x.shape, x_lora.shape)
        ctx.mark_non_differentiable(idx)
        return y.reshape(base_out.shape), logits, gates, idx

    @staticmethod
    def backward(ctx, dy, dlext, dgates, _didx):
        (x2, xl2, uid, A, B, router_x, router_user, router_h, UA, UB, logits, gates, idx, h, hu) = ctx.saved_tensors
        groups, scaling, temperature, user_scaling, same_x, x_shape, xl_shape = ctx.consts
        if xl2 is None:
            xl2 = x2
        needs = dict(zip(("lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B"),
                         ctx.needs_input_grad[3:10]))
        T, E, r = x2.shape[0], A.shape[0], A.shape[1]
        dy2 = dy.reshape(T, -1).to(x2.dtype).contiguous()
        has_u = UA is not None
        dhg = _ops.bgmv_shrink(dy2, B, idx, True, False) * scaling  # d(g h): [T, k, r]
        dgate = (dhg * h).sum(-1)
        if dgates is not None:  # the gates' own gradient (a loss on the routing)
            dgate = dgate + dgates.float()
        dh = (dhg * gates[:, :, None]).contiguous()
        dlogits = _ops.router_topk_backward(logits, idx, dgate.contiguous(), temperature)
        if dlext is not None:
            dlogits = dlogits + dlext.float()
        if has_u:
            dhu = _ops.bgmv_shrink(dy2, UB, uid[:, None], True, False)[:, 0] * user_scaling
            if router_h is not None:
                dhu = dhu + dlogits @ router_h.float()
            dhu = torch.where((uid >= 0)[:, None], dhu, torch.zeros((), device=dhu.device))
        else:
            dhu = hu
        dxl = _ops.bgmv_expand(dh, A, idx, None, None, True, False)
        if has_u:
            dxl = _ops.bgmv_expand(dhu[:, None].contiguous(), UA, uid[:, None], None, dxl, True, False)
        dxr = dlogits @ router_x.float() if router_x is not None else None
        if same_x:
            dx = (dxl + dxr if dxr is not None else dxl).to(x2.dtype).reshape(x_shape)
            dx_lora = None
        else:
            dx = dxr.to(x2.dtype).reshape(x_shape) if dxr is not None else None
            dx_lora = dxl.to(xl2.dtype).reshape(xl_shape)
        dA = dB = None
        if needs["lora_A"]:
            dA = (_dense_slots(dh, idx, E).t() @ xl2.float()).reshape(A.shape).to(A.dtype)
        if needs["lora_B"]:
            hg = _dense_slots(h * gates[:, :, None], idx, E)
            dB = ((dy2.float().t() @ hg) * scaling).reshape(B.shape[1], E, r).permute(1, 0, 2).to(B.dtype)
        g = router_and_bank_grads(dlogits, dhu, dy2, x2, xl2, hu, uid, groups, router_x, router_user, router_h,
                                  UA, UB, user_scaling, needs)
        dbase = dy if ctx.needs_input_grad[2] else None
        return (dx, dx_lora, dbase, dA, dB, g.get("router_x"), g.get("router_user"), g.get("router_h"),
                g.get("user_A"), g.get("user_B"), None, None, None, None, None, None, None)


def proper_linear(x, base_out, lora_A, lora_B, scaling, *, top_k, temperature=1.0, router_x=None,
                  router_user=None, router_h=None, user_ids=None, user_A=None, user_B=None,
                  user_scaling=0.0, x_lora=None, inplace=False, sparse_grad=False):
    """Same contract as proper_kernels.reference.proper_linear (gates and logits carry
    gradients)."""
    if sparse_grad:
        raise ValueError("sparse_grad (sparse user-bank gradients) needs the triton or torch backend")
    same_x = x_lora is None or x_lora is x  # inplace: not used, the kernels write a fresh output
    if user_A is not None and user_A.shape[1] == 0:
        user_A = user_B = None
    if user_A is None:
        router_h = None
    uid = token_user_ids(user_ids, x.shape[:-1], x.device)
    groups = user_ids.shape[0] if user_ids is not None and user_ids.shape != x.shape[:-1] else None
    y, logits, gates, idx = _ProperLinear.apply(
        x, x if same_x else x_lora, base_out, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
        uid, groups, float(scaling), int(top_k), float(temperature), float(user_scaling), same_x,
    )
    return y, Routing(logits.to(x.dtype), gates.to(x.dtype), idx)
