"""The whole ProperLinear math in plain PyTorch: the oracle and the CPU fallback.

Every other backend is tested against these functions. They work in any floating dtype
(float64 included) and autograd gives their backward. They do not validate their inputs:
``proper_kernels.proper_linear`` / ``proper_kernels.router_topk`` check arguments once and
then call a backend such as this one.

Notation: x [T, in] tokens, E experts of rank r (lora_A [E, r, in],
lora_B [E, out, r]), a bank of N users of rank r_u (user_A [N, r_u, in],
user_B [N, out, r_u]), routers router_x [E, in], router_user [N + 1, E] (last row: users
without a row, id -1) and router_h [E, r_u].

Design: docs/DESIGN.md#math (the math this oracle computes).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["Routing", "router_logits", "router_topk", "proper_linear", "user_shrink"]


class Routing(NamedTuple):
    """What the router decided for each token (flattened to T tokens)."""

    logits: Tensor  # [T, E] router logits before the temperature
    gates: Tensor  # [T, k] renormalised gates, in the order of `indices`
    indices: Tensor  # [T, k] int64 expert indices, best first, ties to the lower index


def router_topk(logits: Tensor, top_k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """softmax(logits / temperature) over the last dim, keep the top k, renormalise.

    Ties go to the lower expert index (a stable descending sort). A NaN anywhere in a row
    makes every gate of that row NaN; its indices stay valid expert numbers. 16-bit logits
    are routed in fp32 (as every backend does); the gates come back in the logits' dtype.
    """
    dtype = logits.dtype
    logits = logits.to(torch.promote_types(dtype, torch.float32))
    probs = torch.softmax(logits / temperature, dim=-1)
    # A stable descending sort keeps equal probabilities in index order, so ties go to the
    # lower expert; torch.topk gives no such guarantee.
    indices = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[..., :top_k]
    top = torch.gather(probs, -1, indices)
    gates = top / top.sum(dim=-1, keepdim=True)
    return gates.to(dtype), indices


def _groups(user_ids: Tensor, lead_shape: torch.Size) -> tuple[int, Tensor]:
    """How the T tokens split into S groups of one user each: (S, ids [S]).

    Per-token ids (shaped like x's leading dims) make every token its own group; per-sequence
    ids ([B] for x [B, ..., in]) keep each sequence together, so a user's rows are gathered
    once per sequence rather than once per token.
    """
    if user_ids.shape == lead_shape:
        ids = user_ids.reshape(-1)
    else:
        ids = user_ids
    return ids.shape[0], ids


class _GatherRows(torch.autograd.Function):
    """table[rows] whose gradient w.r.t. table is sparse over the first dim (dense rows) when
    asked (``sparse``) or when the gradient that comes back is itself sparse; else dense."""

    @staticmethod
    def forward(ctx, table: Tensor, rows: Tensor, sparse: bool) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.table_shape, ctx.sparse = table.shape, sparse
        return table.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rows,) = ctx.saved_tensors
        shape = ctx.table_shape
        if grad.is_sparse:  # sparse over the gathered rows: map them back to the table's
            grad = grad.coalesce()
            return torch.sparse_coo_tensor(rows[grad.indices()[0]][None], grad.values(), shape,
                                           check_invariants=False).coalesce(), None, None
        if ctx.sparse:
            return torch.sparse_coo_tensor(rows[None], grad, shape, check_invariants=False).coalesce(), None, None
        return grad.new_zeros(shape).index_add_(0, rows, grad), None, None


def gather_rows(table: Tensor, rows: Tensor, sparse: bool = False) -> Tensor:
    """table[rows] (rows 1-D). The gradient of `table` is sparse over `rows` with ``sparse``,
    or when the gradient of the result comes back sparse (a kernel's sparse bank gradient),
    so a bank of a million users never gets a dense gradient; otherwise it is dense."""
    return _GatherRows.apply(table, rows, sparse)


def _take_rows(table: Tensor, rows: Tensor, sparse: bool) -> Tensor:
    """table[rows] (rows 1-D); with ``sparse`` the gradient of `table` is sparse over `rows`."""
    return gather_rows(table, rows, True) if sparse else table[rows]


def _user_rows(user_ids: Tensor, lead_shape: torch.Size, bank: Tensor,
               sparse: bool = False) -> tuple[int, Tensor, Tensor]:
    """(S, each group's bank matrix [S, m, n], has_row [S] as 0/1 in the bank's dtype).

    A user without a row (id -1) gathers row 0; callers zero that group's h_u = A x (a
    [T, r_u] product, much smaller than the gathered matrices), which also zeroes its B^u
    product and every gradient it would send to row 0."""
    S, ids = _groups(user_ids, lead_shape)
    return S, _take_rows(bank, ids.clamp(min=0), sparse), (ids >= 0).to(bank.dtype)


def _by_group(t: Tensor, S: int) -> Tensor:
    """[T, n] -> [S, T / S, n] (T = 0 included, where reshape(S, -1, n) is ambiguous)."""
    t = t.reshape(-1, t.shape[-1])
    return t.reshape(S, t.shape[0] // S if S else 0, t.shape[-1])


def user_shrink(x: Tensor, user_ids: Tensor, user_A: Tensor, sparse_grad: bool = False) -> Tensor:
    """h_u = A^u x for every token of x [..., in], zero where the id is -1. Returns [T, r_u]."""
    S, A, has_row = _user_rows(user_ids, x.shape[:-1], user_A, sparse_grad)
    h = torch.bmm(_by_group(x, S), A.transpose(1, 2)) * has_row[:, None, None]
    return h.reshape(-1, user_A.shape[1])


def _per_token_ids(user_ids: Tensor, lead_shape: torch.Size) -> Tensor:
    if user_ids.shape == lead_shape:
        return user_ids.reshape(-1)
    return user_ids.reshape((-1,) + (1,) * (len(lead_shape) - 1)).expand(lead_shape).reshape(-1)


def router_logits(
    x: Tensor,
    num_experts: int,
    *,
    router_x: Optional[Tensor] = None,
    router_user: Optional[Tensor] = None,
    router_h: Optional[Tensor] = None,
    user_ids: Optional[Tensor] = None,
    h_user: Optional[Tensor] = None,
    sparse_grad: bool = False,
) -> Tensor:
    """logit = W_x x + R[u] + W_h h_u, each term optional. x [..., in]; returns [T, E] in
    fp32 for 16-bit inputs (fp32 accumulation, as in the kernels, so that 16-bit rounding
    never reorders near-tied experts), else in x's dtype.

    With no router term at all the logits are zero (every expert equally likely).
    """
    lead = x.shape[:-1]
    compute = torch.promote_types(x.dtype, torch.float32)
    xt = x.reshape(-1, x.shape[-1])
    logits = torch.zeros(xt.shape[0], num_experts, dtype=compute, device=x.device)
    if router_x is not None:
        logits = logits + xt.to(compute) @ router_x.to(compute).t()
    if router_user is not None:
        default_row = router_user.shape[0] - 1
        if user_ids is None:
            rows = torch.full((xt.shape[0],), default_row, dtype=torch.long, device=x.device)
        else:
            ids = _per_token_ids(user_ids, lead)
            rows = torch.where(ids >= 0, ids, torch.full_like(ids, default_row))
        logits = logits + _take_rows(router_user, rows, sparse_grad).to(compute)
    if router_h is not None and h_user is not None:
        logits = logits + h_user.to(compute) @ router_h.to(compute).t()
    return logits


def proper_linear(
    x: Tensor,
    base_out: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    *,
    top_k: int,
    temperature: float = 1.0,
    router_x: Optional[Tensor] = None,
    router_user: Optional[Tensor] = None,
    router_h: Optional[Tensor] = None,
    user_ids: Optional[Tensor] = None,
    user_A: Optional[Tensor] = None,
    user_B: Optional[Tensor] = None,
    user_scaling: float = 0.0,
    x_lora: Optional[Tensor] = None,
    inplace: bool = False,
    sparse_grad: bool = False,
) -> tuple[Tensor, Routing]:
    """y = base_out + s_g * sum_e g_te B_e A_e x_lora + s_u * B^u A^u x_lora.

    ``x`` feeds the token router; ``x_lora`` (x after adapter dropout, default x) feeds the
    expert and user LoRAs, and through h_u the LoRA-aware router. Experts are evaluated
    densely and masked by the gates (exact: unselected experts get a zero gate and a zero
    gradient). Returns (y shaped like base_out, Routing). With ``inplace``, y is accumulated
    in base_out's memory (where base_out's layout allows) instead of a new tensor.

    One expert, top-1 and no router term (a plain LoRA beside the user bank) skips the
    router: every gate is exactly 1 then. ``scaling == 0`` (alpha = 0: the group level off,
    a user bank alone) skips the expert products: their term is zero, and lora_A/lora_B get
    no gradient (None rather than zeros). ``sparse_grad``: the per-user tables (user_A,
    user_B, router_user) get sparse gradients over the rows in the batch.
    """
    if x_lora is None:
        x_lora = x
    E, r, d_in = lora_A.shape
    d_out = lora_B.shape[1]
    xt = x_lora.reshape(-1, d_in)
    T = xt.shape[0]

    has_user = user_A is not None and user_ids is not None and user_A.shape[1] > 0
    h_user = user_shrink(x_lora, user_ids, user_A, sparse_grad) if has_user else None

    no_router = router_x is None and router_user is None and (router_h is None or h_user is None)
    if E == 1 and no_router:
        logits = torch.zeros(T, 1, dtype=x.dtype, device=x.device)
        gates, indices = torch.ones_like(logits), torch.zeros(T, 1, dtype=torch.long, device=x.device)
        h = xt @ lora_A[0].t() if scaling != 0.0 else None
    else:
        logits = router_logits(
            x,
            E,
            router_x=router_x,
            router_user=router_user,
            router_h=router_h,
            user_ids=user_ids,
            h_user=h_user,
            sparse_grad=sparse_grad,
        )
        gates, indices = router_topk(logits, top_k, temperature)  # fp32 routing, gates in logits' dtype
        gates, logits = gates.to(x.dtype), logits.to(x.dtype)
        # Dense gate matrix [T, E]: zero for experts outside a token's top k.
        dense = torch.zeros(T, E, dtype=gates.dtype, device=gates.device).scatter(1, indices, gates)
        h = None
        if scaling != 0.0:
            h = ((xt @ lora_A.reshape(E * r, d_in).t()).reshape(T, E, r) * dense[:, :, None]).reshape(T, E * r)
    # base + s_g (g h) B_all in one product, then + s_u h_u B^u per user group. s_g = 0 (the
    # group level switched off, alpha = 0: a user bank alone) skips the expert products.
    y = base_out.reshape(T, d_out)
    if scaling != 0.0:
        B_all = lora_B.transpose(1, 2).reshape(E * r, d_out)
        y = y.addmm_(h, B_all, alpha=scaling) if inplace else torch.addmm(y, h, B_all, alpha=scaling)
    elif not inplace:
        y = y.clone()
    if has_user:
        S, Bu, _ = _user_rows(user_ids, x.shape[:-1], user_B, sparse_grad)  # h_u is zero for id -1
        hu, y3 = _by_group(h_user, S), _by_group(y, S)
        # After addmm y is a fresh tensor (or base_out's own memory): accumulating into it is safe.
        y = y3.baddbmm_(hu, Bu.transpose(1, 2), alpha=user_scaling)
    return y.reshape(base_out.shape), Routing(logits, gates, indices)
