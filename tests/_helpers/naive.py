"""An independent, deliberately naive ProperLinear: one token, one expert at a time.

Written straight from the layer's formula (in proper_kernels.reference's docstrings) with
Python loops, sharing no code with proper_kernels.reference, so that the reference (the oracle of every kernel) is itself
checked against something.
"""

import math

import torch


def naive_proper_linear(
    x,
    base_out,
    lora_A,
    lora_B,
    scaling,
    top_k,
    temperature=1.0,
    router_x=None,
    router_user=None,
    router_h=None,
    token_user_ids=None,
    user_A=None,
    user_B=None,
    user_scaling=0.0,
):
    """x [T, in], base_out [T, out], token_user_ids: a list of T ints (-1 = no row).

    Returns (y [T, out], selected experts per token, gates per token)."""
    T = x.shape[0]
    E = lora_A.shape[0]
    ids = token_user_ids if token_user_ids is not None else [-1] * T
    has_bank = user_A is not None and user_A.shape[1] > 0
    ys, chosen, all_gates = [], [], []
    for t in range(T):
        u = int(ids[t])
        xt = x[t]
        hu = user_A[u] @ xt if (has_bank and u >= 0) else None
        logits = []
        for e in range(E):
            v = 0.0
            if router_x is not None:
                v = v + torch.dot(router_x[e], xt)
            if router_user is not None:
                v = v + router_user[u if u >= 0 else router_user.shape[0] - 1, e]
            if router_h is not None and hu is not None:
                v = v + torch.dot(router_h[e], hu)
            logits.append(v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=x.dtype))
        m = max(float(l) for l in logits)
        expo = [torch.exp((l - m) / temperature) for l in logits]
        z = sum(expo)
        probs = [ex / z for ex in expo]
        order = sorted(range(E), key=lambda e: (-float(probs[e]), e))[:top_k]
        kept = sum(probs[e] for e in order)
        gates = [probs[e] / kept for e in order]
        y = base_out[t].clone()
        for g, e in zip(gates, order):
            y = y + scaling * g * (lora_B[e] @ (lora_A[e] @ xt))
        if hu is not None:
            y = y + user_scaling * (user_B[u] @ hu)
        ys.append(y)
        chosen.append(order)
        all_gates.append([float(g) for g in gates])
    return torch.stack(ys), chosen, all_gates


def isclose_list(a, b, rel=1e-9):
    return all(math.isclose(p, q, rel_tol=rel, abs_tol=1e-12) for p, q in zip(a, b))
