"""Device helpers shared by the Triton kernels (router math used by several kernels)."""

import triton
import triton.language as tl


@triton.jit
def softmax_rows(logits, col, E: tl.constexpr, inv_temperature):
    """Row softmax of fp32 logits [BT, EP] over the first E columns (others get 0).

    A NaN or +Inf in a row makes the whole row NaN, as torch.softmax does."""
    z = tl.where(col[None, :] < E, logits * inv_temperature, float("-inf"))
    m = tl.max(z, axis=1)
    p = tl.exp(z - m[:, None])
    p = tl.where(col[None, :] < E, p, 0.0)
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def topk_select(p, col, kcol, E: tl.constexpr, EP: tl.constexpr, TOP_K: tl.constexpr):
    """Top-k of the probabilities p [BT, EP], ties to the lower index, renormalised.

    Returns (indices [BT, KP] int32, gates [BT, KP]); slots >= TOP_K hold index 0 and
    gate 0. In a NaN row no comparison holds: each slot then takes the lowest index not
    chosen yet, so the indices stay distinct and within [0, E), while the gates are NaN.
    The k rounds are a rolled loop (k up to E does not unroll into the kernel). The gates
    keep p's dtype (fp32, or fp64 for the router's fp64 path)."""
    work = tl.where(col[None, :] < E, p, -1.0)
    free = tl.broadcast_to(col[None, :] < E, p.shape)
    idx = tl.zeros((p.shape[0], kcol.shape[0]), dtype=tl.int32)
    raw = tl.zeros((p.shape[0], kcol.shape[0]), dtype=p.dtype)
    for j in range(TOP_K):
        best = tl.max(work, axis=1)
        sel = tl.min(tl.where((work == best[:, None]) & free, col[None, :], EP), axis=1)
        lowest_free = tl.min(tl.where(free, col[None, :], EP), axis=1)
        sel = tl.where(sel == EP, lowest_free, sel)
        hit = col[None, :] == sel[:, None]
        val = tl.sum(tl.where(hit, p, 0.0), axis=1)
        idx = tl.where(kcol[None, :] == j, sel[:, None], idx)
        raw = tl.where(kcol[None, :] == j, val[:, None], raw)
        work = tl.where(hit, -1.0, work)
        free = free & (col[None, :] != sel[:, None])
    total = tl.sum(raw, axis=1)
    return idx, raw / total[:, None]


@triton.jit
def slot(table, kcol, s):
    """Column s of a [BT, KP] per-slot table, as [BT]."""
    return tl.sum(tl.where(kcol[None, :] == s, table, 0), axis=1)


@triton.jit
def topk_backward(p, kept, dgate, inv_temperature):
    """d logits from d gates, for g = p_kept / S and p = softmax(logits * inv_temperature).

    p, kept (0/1 mask of the top-k), dgate: [BT, EP] fp32 (dgate only read where kept)."""
    s = tl.sum(p * kept, axis=1)
    s = tl.where(s > 0, s, 1.0)  # rows past the end of the batch keep nothing
    g = p * kept / s[:, None]
    dp = kept * (dgate - tl.sum(dgate * g, axis=1)[:, None]) / s[:, None]
    return p * (dp - tl.sum(p * dp, axis=1)[:, None]) * inv_temperature
