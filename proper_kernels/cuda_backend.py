"""The `cuda` backend: the CUDA C++ ops of csrc/ (torch.ops.proper.*) composed into
proper_linear and router_topk with autograd.

Decode (up to DECODE_MAX_TOKENS tokens, no adapter dropout): proper_decode, three launches
that each cover the GPU (split-K router and shrink, then the expand; 16-byte loads).
Prefill and training, on tensor cores (csrc/prefill.cuh), over the batch plan's tokens
sorted by user:
  prefill_shrink   h = x A_all^T, logits = x W_x^T + R[u] + h_u W_h^T, h_u per user run;
                   softmax and top-k in its epilogue; also g*h in the input dtype
  prefill_expand   y = base + s_g (g*h) B_all + s_u h_u B^u, in place when allowed
  prefill_bwd_dh   d(g*h) = s_g dy B_all, dh_u = s_u dy B^u; the router backward
  prefill_bwd_dx   dx = dh A_all + dlogits W_x + dh_u A^u
  weight gradients: dense cuBLAS GEMMs over the tokens (dh^T x, dy^T (g*h), the bank rows).
The tensor-core kernels hold E*r + E + r_u <= 256 columns (each padded to 8); wider
shapes take the per-token BGMV kernels (bgmv_shrink / bgmv_expand, CUDA cores), which
backend="auto" never picks for prefill (proper_kernels.auto_table).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import router_and_bank_grads, token_user_ids
from .plan import BatchPlan, build_plan
from .reference import Routing

# Up to this many tokens (with no adapter dropout) the forward is the fused decode kernel.
DECODE_MAX_TOKENS = 256
# The column space of the tensor-core prefill kernels (csrc/ops.h kPrefillMaxColumns).
PREFILL_MAX_COLUMNS = 256


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


def tensor_core_fits(E: int, r: int, r_u: int, router_x: bool) -> bool:
    """Whether the tensor-core prefill kernels hold this shape (else the BGMV path runs)."""
    return E <= 256 and _pad8(E * r) + (_pad8(E) if router_x else 0) + _pad8(r_u) <= PREFILL_MAX_COLUMNS

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


def _backward_inputs(ctx, x2, xl2, dy):
    """(the adapters' input, which weights need a gradient, dy as [T, out] in x's dtype)."""
    needs = dict(zip(("lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B"),
                     ctx.needs_input_grad[3:10]))
    return (x2 if xl2 is None else xl2), needs, dy.reshape(x2.shape[0], dy.shape[-1]).to(x2.dtype).contiguous()


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
        xl2, needs, dy2 = _backward_inputs(ctx, x2, xl2, dy)
        T, E, r = x2.shape[0], A.shape[0], A.shape[1]
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


def _prefill_forward(x2, xl2, base2, table, A, B, router_x, router_user, router_h, UA, UB, scaling, top_k,
                     temperature, user_scaling, inplace):
    """The tensor-core forward: (y, h, hg, hu, logits, gates, idx)."""
    h, hg, hu, logits, gates, idx = _ops.prefill_shrink(x2, xl2, table, A, router_x, router_user, router_h, UA,
                                                        top_k, temperature)
    if inplace:
        _ops.prefill_expand_(base2, hg, hu, table, B, UB, scaling, user_scaling)
        y = base2
    else:
        y = _ops.prefill_expand(hg, hu, table, B, UB, base2, scaling, user_scaling)
    return y, h, hg, hu, logits, gates, idx


class _PrefillLinear(torch.autograd.Function):
    """The tensor-core prefill/training path (csrc/prefill.cuh)."""

    @staticmethod
    def forward(ctx, x, x_lora, base_out, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
                table, uid, groups, scaling, top_k, temperature, user_scaling, same_x):
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in).contiguous()
        xl2 = x2 if same_x else x_lora.reshape(-1, d_in).contiguous()
        base2 = base_out.reshape(-1, base_out.shape[-1]).contiguous()
        A, B = lora_A.contiguous(), lora_B.contiguous()
        UA = user_A.contiguous() if user_A is not None else None
        UB = user_B.contiguous() if user_B is not None else None
        y, h, hg, hu, logits, gates, idx = _prefill_forward(
            x2, xl2, base2, table, A, B, router_x, router_user, router_h, UA, UB, scaling, top_k, temperature,
            user_scaling, False)
        ctx.save_for_backward(x2, None if same_x else xl2, table, uid, A, B, router_x, router_user, router_h, UA, UB,
                              h, hg, hu, logits, gates, idx)
        ctx.consts = (groups, scaling, temperature, user_scaling, same_x, x.shape, x_lora.shape)
        ctx.mark_non_differentiable(idx)
        return y.reshape(base_out.shape), logits, gates, idx

    @staticmethod
    def backward(ctx, dy, dlext, dgates, _didx):
        (x2, xl2, table, uid, A, B, router_x, router_user, router_h, UA, UB, h, hg, hu, logits, gates,
         idx) = ctx.saved_tensors
        groups, scaling, temperature, user_scaling, same_x, x_shape, xl_shape = ctx.consts
        xl2, needs, dy2 = _backward_inputs(ctx, x2, xl2, dy)
        T, E, r = x2.shape[0], A.shape[0], A.shape[1]
        dg_ext = dgates.float().contiguous() if dgates is not None else None
        dl_ext = dlext.float().contiguous() if dlext is not None else None
        dh, dlogits, dhu = _ops.prefill_bwd_dh(dy2, table, B, UB, router_h, h, logits, gates, idx, dg_ext, dl_ext,
                                               scaling, user_scaling, temperature)
        dxl, dxr = _ops.prefill_bwd_dx(dh, dlogits, dhu, table, A, router_x, UA, not same_x)
        if same_x:
            dx, dx_lora = dxl.reshape(x_shape), None
        else:
            dx = dxr.reshape(x_shape) if router_x is not None else None
            dx_lora = dxl.reshape(xl_shape)
        dA = dB = dWx = None
        if same_x and needs["lora_A"] and needs["router_x"] and router_x is not None:
            # one cuBLAS GEMM over x for both: [E r + E, T] @ [T, in]
            both = torch.cat([dh, dlogits.to(dh.dtype)], 1).t() @ xl2
            dA, dWx = both[: E * r].reshape(A.shape), both[E * r:].to(router_x.dtype)
            needs = dict(needs, router_x=False)
        elif needs["lora_A"]:  # [E r, T] @ [T, in]
            dA = (dh.t() @ xl2).reshape(A.shape)
        if needs["lora_B"]:  # [out, T] @ [T, E r]
            dB = ((dy2.t() @ hg) * scaling).reshape(B.shape[1], E, r).permute(1, 0, 2).to(B.dtype)
        g = router_and_bank_grads(dlogits, dhu, dy2, x2, xl2, hu, uid, groups, router_x, router_user, router_h,
                                  UA, UB, user_scaling, needs)
        if dWx is not None:
            g["router_x"] = dWx
        dbase = dy if ctx.needs_input_grad[2] else None
        return (dx, dx_lora, dbase, dA, dB, g.get("router_x"), g.get("router_user"), g.get("router_h"),
                g.get("user_A"), g.get("user_B"), None, None, None, None, None, None, None, None)


def proper_linear(x, base_out, lora_A, lora_B, scaling, *, top_k, temperature=1.0, router_x=None,
                  router_user=None, router_h=None, user_ids=None, user_A=None, user_B=None,
                  user_scaling=0.0, x_lora=None, inplace=False, sparse_grad=False, plan=None):
    """Same contract as proper_kernels.reference.proper_linear (gates and logits carry
    gradients). `plan`: the batch's BatchPlan (or a function returning it), else built here."""
    if sparse_grad:
        raise ValueError("sparse_grad (sparse user-bank gradients) needs the triton or torch backend")
    same_x = x_lora is None or x_lora is x
    if user_A is not None and user_A.shape[1] == 0:
        user_A = user_B = None
    if user_A is None:
        router_h = None
    uid = token_user_ids(user_ids, x.shape[:-1], x.device)
    groups = user_ids.shape[0] if user_ids is not None and user_ids.shape != x.shape[:-1] else None
    router_x, router_user, router_h = (t.contiguous() if t is not None else None
                                       for t in (router_x, router_user, router_h))
    T = uid.shape[0]
    E, r = lora_A.shape[0], lora_A.shape[1]
    r_u = user_A.shape[1] if user_A is not None else 0
    tensors = (x, x_lora, base_out, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    # Decode: inference on few tokens. Training takes the tensor-core path at any size.
    decode = same_x and T <= DECODE_MAX_TOKENS and not needs_grad
    if not decode and tensor_core_fits(E, r, r_u, router_x is not None):
        if callable(plan):
            plan = plan()
        if plan is None:
            n_users = user_A.shape[0] if user_A is not None else (
                router_user.shape[0] - 1 if router_user is not None else None)
            plan = build_plan(user_ids, x.shape[:-1], x.device, n_users)
        elif not isinstance(plan, BatchPlan):
            raise TypeError(f"plan must be a proper_kernels.BatchPlan, got {type(plan).__name__}")
        if needs_grad:
            y, logits, gates, idx = _PrefillLinear.apply(
                x, x if same_x else x_lora, base_out, lora_A, lora_B, router_x, router_user, router_h, user_A,
                user_B, plan.table, uid, groups, float(scaling), int(top_k), float(temperature),
                float(user_scaling), same_x,
            )
        else:  # inference: no autograd node, and the expand may add into base_out's memory
            d_in = x.shape[-1]
            x2 = x.reshape(-1, d_in).contiguous()
            xl2 = x2 if same_x else x_lora.reshape(-1, d_in).contiguous()
            base2 = base_out.reshape(-1, base_out.shape[-1]).contiguous()
            y, _, _, _, logits, gates, idx = _prefill_forward(
                x2, xl2, base2, plan.table, lora_A.contiguous(), lora_B.contiguous(), router_x, router_user,
                router_h, user_A.contiguous() if user_A is not None else None,
                user_B.contiguous() if user_B is not None else None, float(scaling), int(top_k),
                float(temperature), float(user_scaling), bool(inplace))
            y = y.reshape(base_out.shape)
    else:
        y, logits, gates, idx = _ProperLinear.apply(
            x, x if same_x else x_lora, base_out, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
            uid, groups, float(scaling), int(top_k), float(temperature), float(user_scaling), same_x,
        )
    return y, Routing(logits.to(x.dtype), gates.to(x.dtype), idx)
