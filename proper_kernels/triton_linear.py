"""The fused ProperLinear op in Triton: router, top-k, gated expert LoRAs and user LoRA.

This file is the op: the order in which the kernels run forward and backward and the
buffers they share, and the ``torch.library`` ops with their autograd. The sizes and launch
configurations of a call and the choice of strategy are ``triton_call``'s. The kernels and
their launchers live by strategy:

- ``triton_dense`` / ``triton_dense_bwd``: kernels over blocks of the plan's sorted tokens
  (``proper_kernels.plan``); a block holds the runs of a few users, so the user LoRA is
  one GEMM per run against that user's rows. With E*r up to 256 they hold all experts'
  columns in one tile and are the whole dense strategy; for the grouped strategy they do
  the routing, the user LoRA, the router backward and the final sums.
- ``triton_grouped``: (token, slot) pairs sorted by expert, for many experts.

Dots take their operands in the input dtype (bf16/fp16) with fp32 accumulators; fp32 inputs
run in IEEE fp32, or TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set. Under the
Triton interpreter bf16 is upcast first (``DT``, a constexpr): the interpreter holds bf16 as
raw 16-bit words.

x, x_lora, base_out (and y when written in place), dy and the gradients of the gates and
logits are passed with their strides: no copy of a [T, in] or [T, out] tensor. Every output
and side buffer is allocated here (``_empty``). The weights are read contiguous (see
``_weight``). Nothing syncs with the host. Launch configurations come from
``proper_kernels.launch``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import launch as _launch
from . import triton_dense, triton_dense_bwd, triton_grouped
from .plan import ORDER, RUN, RUN_END, RUN_USER, UID, BatchPlan, build_plan, check_plan
from .reference import Routing
from .triton_call import DENSE_MAX_COLUMNS, STRATEGIES, Call, choose_strategy, meta_len, side_widths  # noqa: F401
from .triton_blocks import bank_bytes as _bank_bytes
from .triton_blocks import dot_dtype as _dot_dtype  # noqa: F401  (read here by the tests)
from .triton_blocks import nbytes as _nbytes


_Call = Call  # the name cost.py and the tests use


def _empty(*shape, device, dtype) -> Tensor:
    """Every output and side buffer comes from here (tests poison it to catch unwritten
    elements)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _weight(t: Optional[Tensor]) -> Optional[Tensor]:
    """A weight as the kernels read it: contiguous. The kernels index the weights by their
    shapes (A_all [E*r, in] as one matrix, B_all^T through [E, out, r], a bank row by its
    user), which keeps every weight tile's alignment known at compile time. A parameter is
    contiguous, so this copies only a weight view handed in, and then the weight's size,
    not the batch's."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _tokens(t: Tensor) -> Tensor:
    """[..., n] as [T, n] for the kernels, which take its two strides: a view whenever the
    leading dimensions fold into one (torch copies only a layout that cannot)."""
    return t.reshape(-1, t.shape[-1])


def forward(s: Call, x2, xl2, base2, table, lora_A, lora_B, scaling, temperature,
            router_x, router_user, router_h, user_A, user_B, user_scaling, y=None, bank_rows=None):
    """Launch the forward. x2, xl2, base2 (and y): 2-D [T, *] in any layout; the weights
    contiguous; `table` is the plan's [6, T]. bank_rows: how many bank rows the batch reads
    (for the byte counts; default the bank).

    Returns y (written into `y` when given, which may be base2 itself) and the side outputs
    the backward needs: (h, g*h, h_u, logits, gates fp32, indices, meta), meta packing the
    grouped schedule (empty for dense)."""
    dev = x2.device
    f32 = dict(device=dev, dtype=torch.float32)
    T, has_u = s.T, s.RU > 0
    rows4 = (table[UID], table[ORDER], table[RUN], table[RUN_USER])
    rows, width = side_widths(s)
    h = _empty(rows, width, **f32)
    hg = _empty(rows, width, device=dev, dtype=x2.dtype)
    hu = _empty(T, max(s.RU, 1), **f32)
    logits = _empty(T, s.E, **f32)
    gates = _empty(T, s.TOP_K, **f32)
    idx = _empty(T, s.TOP_K, device=dev, dtype=torch.long)
    dummy = x2
    has_wx, has_r = router_x is not None, router_user is not None
    default_row = (router_user.shape[0] - 1) if has_r else 0
    bank = _bank_bytes(user_A, bank_rows) if has_u else 0
    bank_b = _bank_bytes(user_B, bank_rows) if has_u else 0
    routed = _nbytes(*((h, hg) if s.dense else ()), hu if has_u else None, logits, gates, idx)  # what routing writes
    if s.split == 1:
        outs = (h, hg, hu, logits, gates, idx)
        written = routed
    else:  # partial sums [split, T, *] of h, h_u and logits, summed by the route kernel
        outs = (_empty(s.split, T, s.ER, **f32) if s.dense else dummy,
                hg, _empty(s.split, T, s.RU, **f32) if has_u else dummy,
                _empty(s.split, T, s.E, **f32) if has_wx else dummy, gates, idx)
        written = 4 * s.split * T * ((s.ER if s.dense else 0) + (s.E if has_wx else 0) + s.RU)
    triton_dense.shrink(s, x2, xl2, rows4, lora_A, router_x, user_A, router_user, router_h, outs, temperature,
                        default_row, bank, written)
    if s.split > 1:
        triton_dense.route(s, (outs[0], outs[3], outs[2]), rows4[0], has_wx, router_user, router_h,
                           (h, hg, hu, logits, gates, idx), temperature, default_row, written, routed)
    extra = dummy
    meta = torch.empty(0, dtype=torch.long, device=dev)
    wide = dummy
    if not s.dense:
        sched = triton_grouped.make_schedule(idx, s.E, s.BLOCK_P)
        meta = sched.pack()
        if s.wide_shrink:
            wide = hg
            triton_grouped.shrink_wide(s, xl2, lora_A, gates, idx, h, hg)
        else:
            # zeros: the columns of the experts a token did not pick
            wide = torch.zeros(T, s.ER, device=dev, dtype=x2.dtype) if s.wide else dummy
            triton_grouped.shrink(s, sched, xl2, lora_A, gates, h, hg, wide)
        if not s.wide:
            extra = torch.zeros(T, s.OUT, **f32)  # accumulated by atomic adds: must start at 0
            triton_grouped.expand(s, sched, hg, lora_B, extra, scaling)
    if y is None:
        y = _empty(T, s.OUT, device=dev, dtype=base2.dtype)
    triton_dense.expand(s, hg if s.dense else wide, hu, rows4, lora_B, user_B, base2, extra, y, scaling,
                        user_scaling, bank_b)
    return y, (h, hg, hu, logits, gates, idx, meta)


def backward(s: Call, dy2, dgates, dlext, saved, x2, xl2, table, max_runs, lora_A, lora_B, scaling, temperature,
             router_x, router_user, router_h, user_A, user_B, user_scaling, needs, compact):
    """Gradients by name: x, x_lora, lora_A, lora_B, router_x, router_user, router_h, user_A,
    user_B (absent: not needed). dy2, dgates, dlext, x2, xl2 in any 2-D layout. compact:
    the bank's as [max_runs, ...] rows of the runs, for a sparse gradient."""
    h, hg, hu, logits, gates, idx, meta = saved
    has_u = s.RU > 0
    dev = x2.device
    f32 = dict(device=dev, dtype=torch.float32)
    T = s.T
    rows4 = (table[UID], table[ORDER], table[RUN], table[RUN_USER])
    uid = rows4[0]
    # wide (pairs write dh): zeros, the columns of the experts a token did not pick
    dcat = (torch.zeros if s.wide and not s.wide_bwd else _empty)(T, s.CW, device=dev, dtype=x2.dtype)
    dhu = _empty(T, max(s.RU, 1), **f32)
    dlogits = _empty(T, s.E, **f32)
    dummy = x2
    dslot = dummy
    extra = dummy
    has_wh = router_h is not None and has_u
    if not s.dense:
        sched = triton_grouped.Schedule.unpack(meta, s.num_pairs(), s.E, s.BLOCK_P)
        dslot = _empty(T, s.TOP_K, **f32)
        dh = _empty(s.num_pairs(), s.R, **f32) if not s.wide_bwd else dummy
        if s.wide_bwd:
            triton_grouped.bwd_dh_wide(s, dy2, lora_B, h, gates, idx, dslot, dcat, scaling)
        else:
            triton_grouped.bwd_dh(s, sched, dy2, lora_B, h, gates, dh, dslot, dcat if s.wide else dummy, scaling)
            if not s.wide:
                extra = torch.zeros(T, s.IN, **f32)  # accumulated by atomic adds: must start at 0
                triton_grouped.bwd_dx(s, sched, dh, lora_A, extra)
    triton_dense_bwd.bwd_dh(s, dy2, rows4, lora_B, user_B, router_h, h, logits, gates, idx, dlext, dgates, dslot,
                            dcat, dlogits, dhu, scaling, user_scaling, temperature, max_runs, dummy)
    same_x = xl2 is x2
    has_wx = router_x is not None
    dxl = _empty(*xl2.shape, device=dev, dtype=xl2.dtype)
    dx = dxl if same_x or not has_wx else _empty(*x2.shape, device=dev, dtype=x2.dtype)
    triton_dense_bwd.bwd_dx(s, dcat, dhu, rows4, lora_A, user_A, router_x, extra, dxl, dx, same_x, max_runs, dummy)
    grads: dict = dict(x=dxl if same_x else (dx if has_wx else None), x_lora=None if same_x else dxl)
    # Weight gradients: one pass over x (lora_A, router_x, the bank's user_A) and one over dy
    # (lora_B, the bank's user_B), on tensor cores in the input dtype with fp32 accumulation.
    need_a = s.dense and needs["lora_A"] and scaling != 0.0
    need_b = s.dense and needs["lora_B"] and scaling != 0.0
    need_wx = has_wx and needs["router_x"]
    need_ua = has_u and needs["user_A"]
    need_ub = has_u and needs["user_B"]
    bank_rows = max_runs if compact else (user_A.shape[0] if has_u else 0)
    wx_here = need_wx and same_x  # router_x reads x, not x_lora: with dropout it gets its own GEMM
    if need_a or wx_here or need_ua:
        ga = _empty(s.ER, s.IN, device=dev, dtype=lora_A.dtype) if need_a else dummy
        gwx = _empty(s.E, s.IN, device=dev, dtype=router_x.dtype) if wx_here else dummy
        gua = torch.zeros(bank_rows, s.RU, s.IN, device=dev, dtype=user_A.dtype) if need_ua else dummy
        triton_dense_bwd.wgrad_in(s, dcat, dhu, xl2, rows4, table[RUN_END], ga, gwx, gua, need_a, wx_here, need_ua,
                                  compact, max_runs)
        if need_a:
            grads["lora_A"] = ga.reshape(lora_A.shape)
        if wx_here:
            grads["router_x"] = gwx
        if need_ua:
            grads["user_A"] = gua
    if need_wx and not same_x:
        grads["router_x"] = _matmul_t(dcat[:, s.LOFF:], x2)
    if need_b or need_ub:
        gb = _empty(*lora_B.shape, device=dev, dtype=lora_B.dtype) if need_b else dummy
        gub = torch.zeros(bank_rows, s.OUT, s.RU, device=dev, dtype=user_B.dtype) if need_ub else dummy
        triton_dense_bwd.wgrad_out(s, dy2, hg, hu, rows4, table[RUN_END], gb, gub, need_b, need_ub, compact, scaling,
                                   user_scaling, max_runs)
        if need_b:
            grads["lora_B"] = gb
        if need_ub:
            grads["user_B"] = gub
    if scaling != 0.0 and not s.dense:
        if needs["lora_A"]:
            out = _empty(s.E, s.R, s.IN, device=dev, dtype=lora_A.dtype)
            grads["lora_A"] = triton_grouped.segment_gemm(s, sched, dcat if s.wide_bwd else dh, xl2, out, s.R, s.IN,
                                                          False, True, 1.0, left_wide=s.wide_bwd)
        if needs["lora_B"]:
            out = _empty(s.E, s.OUT, s.R, device=dev, dtype=lora_B.dtype)
            grads["lora_B"] = triton_grouped.segment_gemm(s, sched, dy2, hg, out, s.OUT, s.R, True, False, scaling,
                                                          right_wide=s.wide_shrink)
    if router_user is not None and needs["router_user"]:
        rows = torch.where(uid >= 0, uid, router_user.shape[0] - 1)
        if compact:
            grads["router_user"] = (rows, dlogits.to(router_user.dtype))
        else:
            table_grad = torch.zeros(router_user.shape, **f32)
            grads["router_user"] = table_grad.index_add_(0, rows, dlogits).to(router_user.dtype)
    if has_wh and needs["router_h"]:
        grads["router_h"] = (dlogits.t() @ hu).to(router_h.dtype)
    return grads


def _matmul_t(left: Tensor, right: Tensor, scale: float = 1.0) -> Tensor:
    """scale * left^T right over the tokens, in the input dtype with fp32 accumulation
    (cuBLAS); recorded as a launch inside ``launch.recording`` (meta tensors)."""
    out = left.t() @ right
    if scale != 1.0:
        out = out * scale
    if left.device.type == "meta":
        _launch.record_external("matmul", bytes=_nbytes(left, right, out),
                                flops=2 * left.shape[0] * left.shape[1] * right.shape[1])
    return out


# -- torch.library ops: torch.compile and CUDA graphs see each direction as one op ------------

_GRAD_NAMES = ("x", "x_lora", "lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")


def _call_of(x: Tensor, lora_A: Tensor, lora_B: Tensor, top_k: int, user_A: Optional[Tensor], strategy: str):
    x2 = x.reshape(-1, x.shape[-1])
    return _Call(x2, lora_A, lora_B, top_k, user_A.shape[1] if user_A is not None else 0, strategy)


def _run_forward(x, x_lora, base_out, plan, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
                 scaling, top_k, temperature, user_scaling, same_x, strategy, in_place):
    s = _call_of(x, lora_A, lora_B, top_k, user_A, strategy)
    x2 = _tokens(x)
    xl2 = x2 if same_x else _tokens(x_lora)
    base2 = _tokens(base_out)
    if in_place and not _no_overlap(base2):
        in_place = False  # elements that share memory (an expanded view): y gets its own
    p = [_weight(t) for t in (lora_A, lora_B, router_x, router_user, router_h, user_A, user_B)]
    y, side = forward(s, x2, xl2, base2, plan, *p[:2], scaling, temperature, *p[2:], user_scaling,
                      y=base2 if in_place else None)
    return y, side


def _no_overlap(t: Tensor) -> bool:
    """Whether no two elements of the 2-D t share memory (so it can be written in place)."""
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1)
    span = 1
    for st, n in dims:
        if st < span:
            return False
        span = st * n
    return True


@torch.library.custom_op("proper::triton_linear_fwd", mutates_args=())
def _fwd_op(
    x: Tensor, x_lora: Tensor, base_out: Tensor, plan: Tensor, lora_A: Tensor, lora_B: Tensor,
    router_x: Optional[Tensor], router_user: Optional[Tensor], router_h: Optional[Tensor],
    user_A: Optional[Tensor], user_B: Optional[Tensor],
    scaling: float, top_k: int, temperature: float, user_scaling: float, same_x: bool, max_runs: int, strategy: str,
    compact: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, logits fp32, gates fp32, indices, h, g*h, h_u, schedule): y shaped like base_out.

    plan: a BatchPlan's table [6, T]; max_runs: its bound on the runs; compact: the
    backward gives the bank and the user router sparse gradients."""
    y, side = _run_forward(x, x_lora, base_out, plan, lora_A, lora_B, router_x, router_user, router_h, user_A,
                           user_B, scaling, top_k, temperature, user_scaling, same_x, strategy, False)
    return (y.reshape(base_out.shape),) + side[3:6] + side[:3] + (side[6],)


@_fwd_op.register_fake
def _(x, x_lora, base_out, plan, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
      scaling, top_k, temperature, user_scaling, same_x, max_runs, strategy, compact):
    s = _call_of(x, lora_A, lora_B, top_k, user_A, strategy)
    rows, width = side_widths(s)
    f32 = dict(dtype=torch.float32)
    return (
        base_out.new_empty(base_out.shape), x.new_empty(s.T, s.E, **f32), x.new_empty(s.T, top_k, **f32),
        x.new_empty(s.T, top_k, dtype=torch.long), x.new_empty(rows, width, **f32),
        x.new_empty(rows, width), x.new_empty(s.T, max(s.RU, 1), **f32),
        x.new_empty(meta_len(s), dtype=torch.long),
    )


@torch.library.custom_op("proper::triton_linear_fwd_", mutates_args=("base_out",))
def _fwd_inplace_op(
    x: Tensor, x_lora: Tensor, base_out: Tensor, plan: Tensor, lora_A: Tensor, lora_B: Tensor,
    router_x: Optional[Tensor], router_user: Optional[Tensor], router_h: Optional[Tensor],
    user_A: Optional[Tensor], user_B: Optional[Tensor],
    scaling: float, top_k: int, temperature: float, user_scaling: float, same_x: bool, strategy: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Inference: the adapters are added into base_out's own memory (vLLM's add_inputs).
    Returns (logits fp32, gates fp32, indices)."""
    y, side = _run_forward(x, x_lora, base_out, plan, lora_A, lora_B, router_x, router_user, router_h, user_A,
                           user_B, scaling, top_k, temperature, user_scaling, same_x, strategy, True)
    if y.data_ptr() != base_out.data_ptr():  # y is not base_out's memory (a layout reshape copied): copy back
        base_out.copy_(y.reshape(base_out.shape))
    return side[3], side[4], side[5]


@_fwd_inplace_op.register_fake
def _(x, x_lora, base_out, plan, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
      scaling, top_k, temperature, user_scaling, same_x, strategy):
    T = plan.shape[1]
    f32 = dict(dtype=torch.float32)
    return (x.new_empty(T, lora_A.shape[0], **f32), x.new_empty(T, top_k, **f32),
            x.new_empty(T, top_k, dtype=torch.long))


@torch.library.custom_op("proper::triton_linear_bwd", mutates_args=())
def _bwd_op(
    dy: Tensor, dgates: Optional[Tensor], dlogits: Optional[Tensor], x: Tensor, x_lora: Tensor, plan: Tensor,
    lora_A: Tensor, lora_B: Tensor, router_x: Optional[Tensor], router_user: Optional[Tensor],
    router_h: Optional[Tensor], user_A: Optional[Tensor], user_B: Optional[Tensor],
    logits: Tensor, gates: Tensor, idx: Tensor, h: Tensor, hg: Tensor, hu: Tensor, meta: Tensor,
    scaling: float, top_k: int, temperature: float, user_scaling: float, same_x: bool, max_runs: int, strategy: str,
    needs: list[bool], compact: bool,
) -> list[Tensor]:
    """Gradients in the order of _GRAD_NAMES (an empty tensor: no gradient), then, with
    compact, the user router's rows. compact: the bank's gradients as [max_runs, ...] values
    (rows: the plan's run users) and the user router's as [T, E] values."""
    return _run_backward(dy, dgates, dlogits, x, x_lora, plan, lora_A, lora_B, router_x, router_user, router_h,
                         user_A, user_B, logits, gates, idx, h, hg, hu, meta, scaling, top_k, temperature,
                         user_scaling, same_x, max_runs, strategy, needs, compact)


def _run_backward(dy, dgates, dlogits, x, x_lora, plan, lora_A, lora_B, router_x, router_user, router_h, user_A,
                  user_B, logits, gates, idx, h, hg, hu, meta, scaling, top_k, temperature, user_scaling, same_x,
                  max_runs, strategy, needs, compact):
    s = _call_of(x, lora_A, lora_B, top_k, user_A, strategy)
    x2 = _tokens(x)
    xl2 = x2 if same_x else _tokens(x_lora)
    p = [_weight(t) for t in (lora_A, lora_B, router_x, router_user, router_h, user_A, user_B)]
    g = backward(
        s, _tokens(dy), dgates, dlogits, (h, hg, hu, logits, gates, idx, meta), x2, xl2, plan,
        max_runs, *p[:2], scaling, temperature, *p[2:], user_scaling, dict(zip(_GRAD_NAMES[2:], needs)), compact,
    )
    rows = x.new_empty(0, dtype=torch.long)
    if compact and isinstance(g.get("router_user"), tuple):
        rows, g["router_user"] = g["router_user"]
    out = [x.new_empty(0) if g.get(n) is None else g[n].reshape(x.shape) if n in ("x", "x_lora") else g[n]
           for n in _GRAD_NAMES]
    return out + [rows]


def _grad_present(name, same_x, router_x, has_u, router_user, router_h, needs, scaling):
    if name == "x":
        return same_x or router_x is not None
    if name == "x_lora":
        return not same_x
    need = dict(zip(_GRAD_NAMES[2:], needs))[name]
    present = dict(lora_A=scaling != 0.0, lora_B=scaling != 0.0, router_x=router_x is not None,
                   router_user=router_user is not None, router_h=router_h is not None and has_u,
                   user_A=has_u, user_B=has_u)[name]
    return need and present


@_bwd_op.register_fake
def _(dy, dgates, dlogits, x, x_lora, plan, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
      logits, gates, idx, h, hg, hu, meta, scaling, top_k, temperature, user_scaling, same_x, max_runs, strategy,
      needs, compact):
    has_u = user_A is not None and user_A.shape[1] > 0
    like = dict(x=x, x_lora=x, lora_A=lora_A, lora_B=lora_B, router_x=router_x, router_user=router_user,
                router_h=router_h, user_A=user_A, user_B=user_B)
    out = []
    for n in _GRAD_NAMES:
        if not _grad_present(n, same_x, router_x, has_u, router_user, router_h, needs, scaling):
            out.append(x.new_empty(0))
        elif compact and n in ("user_A", "user_B"):
            out.append(like[n].new_empty((max_runs,) + tuple(like[n].shape[1:])))
        elif compact and n == "router_user":
            out.append(router_user.new_empty(plan.shape[1], router_user.shape[1]))
        else:
            out.append(torch.empty_like(like[n]))
    rows_present = compact and _grad_present("router_user", same_x, router_x, has_u, router_user, router_h, needs,
                                             scaling)
    out.append(x.new_empty(plan.shape[1] if rows_present else 0, dtype=torch.long))
    return out


def _setup_context(ctx, inputs, output):
    (x, x_lora, base_out, plan, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
     scaling, top_k, temperature, user_scaling, same_x, max_runs, strategy, compact) = inputs
    _, logits, gates, idx, h, hg, hu, meta = output
    ctx.save_for_backward(x, x_lora, plan, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B,
                          logits, gates, idx, h, hg, hu, meta)
    ctx.consts = (scaling, top_k, temperature, user_scaling, same_x, max_runs, strategy)
    ctx.sparse = compact
    ctx.shapes = (None if router_user is None else router_user.shape, None if user_A is None else user_A.shape,
                  None if user_B is None else user_B.shape)
    ctx.mark_non_differentiable(idx, h, hg, hu, meta)


def _backward(ctx, dy, dlogits, dgates, *_unused):
    saved = ctx.saved_tensors
    x = saved[0]
    scaling, top_k, temperature, user_scaling, same_x, max_runs, strategy = ctx.consts
    compact = ctx.sparse
    needs = list(ctx.needs_input_grad[4:11])
    grads = _bwd_op(dy, dgates, dlogits, *saved[:3], *saved[3:], scaling, top_k, temperature, user_scaling,
                    same_x, max_runs, strategy, needs, compact)
    rows = grads[-1]
    g = dict(zip(_GRAD_NAMES, grads[:-1]))
    # An empty 1-D tensor means no gradient; T = 0 gives empty gradients of x and (compact)
    # of the user router's rows, which are kept.
    g = {n: (t if t.numel() or (n in ("x", "x_lora") and t.shape == x.shape)
             or (n == "router_user" and compact and t.dim() == 2) else None) for n, t in g.items()}
    if compact:
        plan = saved[2]
        ru_shape, ua_shape, ub_shape = ctx.shapes
        users = plan[RUN_USER][:max_runs].clamp(min=0)[None]
        n = users.shape[1]  # max_runs, except for T = 0 (no runs, a bound of 1)
        if g["user_A"] is not None:
            g["user_A"] = torch.sparse_coo_tensor(users, g["user_A"][:n], ua_shape, check_invariants=False)
        if g["user_B"] is not None:
            g["user_B"] = torch.sparse_coo_tensor(users, g["user_B"][:n], ub_shape, check_invariants=False)
        if g["router_user"] is not None:
            g["router_user"] = torch.sparse_coo_tensor(rows[None], g["router_user"], ru_shape, check_invariants=False)
    dxl = None if same_x else g["x_lora"]
    dbase = dy if ctx.needs_input_grad[2] else None
    return (g["x"], dxl, dbase, None, g["lora_A"], g["lora_B"], g["router_x"], g["router_user"], g["router_h"],
            g["user_A"], g["user_B"], None, None, None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def plan_for(user_ids: Optional[Tensor], x: Tensor, user_A: Optional[Tensor], router_user: Optional[Tensor],
             plan=None) -> BatchPlan:
    """The batch plan for this call: `plan` (a BatchPlan, or a function returning one), or a
    new one built from user_ids."""
    if callable(plan):
        plan = plan()
    if plan is not None:
        return check_plan(plan, x)
    n_users = user_A.shape[0] if user_A is not None else (router_user.shape[0] - 1 if router_user is not None else None)
    return build_plan(user_ids, x.shape[:-1], x.device, n_users)


def proper_linear(x, base_out, lora_A, lora_B, scaling, *, top_k, temperature=1.0, router_x=None,
                  router_user=None, router_h=None, user_ids=None, user_A=None, user_B=None,
                  user_scaling=0.0, x_lora=None, inplace=False, sparse_grad=False, strategy=None, plan=None):
    """Same contract as proper_kernels.reference.proper_linear; the gates carry a gradient.

    strategy: "dense" | "grouped" | None (chosen from E*r by choose_strategy). plan: the
    batch's BatchPlan (or a function returning it), shared by every layer; built from
    user_ids when None. inplace: without autograd the adapters are added into base_out."""
    same_x = x_lora is None or x_lora is x
    if user_A is not None and user_A.shape[1] == 0:
        user_A = user_B = None
    if user_A is None:
        router_h = None
    if strategy is None:
        strategy = choose_strategy(lora_A.shape[0], lora_A.shape[1])
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    bp = plan_for(user_ids, x, user_A, router_user, plan)
    args = (x, x if same_x else x_lora, base_out, bp.table, lora_A, lora_B, router_x, router_user, router_h,
            user_A, user_B, float(scaling), int(top_k), float(temperature), float(user_scaling), same_x)
    params = [t for t in (x, x_lora, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B) if t is not None]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    if inplace and not grad and base_out.is_contiguous() and not base_out.requires_grad:
        logits, gates, idx = _fwd_inplace_op(*args, strategy)
        y = base_out
    else:
        y, logits, gates, idx, *_ = _fwd_op(*args, bp.max_runs, strategy, bool(sparse_grad))
    return y, Routing(logits.to(x.dtype), gates.to(x.dtype), idx)
