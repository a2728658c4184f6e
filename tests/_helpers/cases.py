"""Random cases of the fused op: make_case, and the covering grid of shapes the backend tests
run. Needs only torch (the Triton tests run in a venv without the training wing's extras)."""

import torch

DT = torch.float64


def make_case(seed, T, d_in, d_out, E, k, r, r_u, n_users, sources, per_sequence=False, seq_len=1, cold=True):
    """Random inputs for one case; user ids mix known users and (when cold) -1."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    lead = (T // seq_len, seq_len) if per_sequence else (T,)
    x = rnd(*lead, d_in)
    case = dict(
        x=x,
        base_out=rnd(*lead, d_out),
        lora_A=rnd(E, r, d_in) * 0.5,
        lora_B=rnd(E, d_out, r) * 0.5,
        scaling=1.7,
        top_k=k,
        temperature=0.8,
        router_x=rnd(E, d_in) if "token" in sources else None,
        router_user=rnd(n_users + 1, E) if "user" in sources else None,
        router_h=rnd(E, r_u) if ("lora" in sources and r_u > 0) else None,
        user_A=rnd(n_users, r_u, d_in) if r_u > 0 else None,
        user_B=rnd(n_users, d_out, r_u) if r_u > 0 else None,
        user_scaling=0.9 if r_u > 0 else 0.0,
    )
    low = -1 if cold else 0
    ids = torch.randint(low, n_users, (lead[0],), generator=g)
    if cold:
        ids[0] = -1  # always at least one user without a row
    case["user_ids"] = ids
    return case


SOURCE_SETS = [(), ("token",), ("user",), ("lora",), ("token", "user"), ("token", "lora"), ("user", "lora"),
               ("token", "user", "lora")]
SIZES = [(5, 3), (70, 37), (130, 67)]  # not multiples of the block


def grid():
    """A covering grid: every value of every axis appears, without the full product."""
    cases = []
    i = 0
    for E, k in [(1, 1), (4, 1), (4, 2), (4, 4), (16, 2), (16, 16)]:
        for sources in SOURCE_SETS:
            T = (1, 7, 129)[i % 3]
            d_in, d_out = SIZES[(i // 3) % 3]
            r = (4, 16)[i % 2] if E < 16 else 4
            r_u = (0, 8)[(i // 2) % 2]
            cold = i % 4 != 3
            cases.append((T, d_in, d_out, E, k, r, r_u, sources, cold))
            i += 1
    return cases


# -- edge inputs (NaN / Inf, zero tokens), shared by the Triton and the CUDA edge tests --------

class EDGE:
    """70 tokens (140 pairs: several blocks), 12 -> 10 features, 8 experts top-2, rank 4,
    a rank-8 bank of 6 users."""
    T, d_in, d_out, E, K, r, r_u, users = 70, 12, 10, 8, 2, 4, 8, 6


def special_case(where, value):
    """A full case (token, user and LoRA-aware routers, a user bank) with one NaN or +-Inf:
    in x (token 2) or in a router table (for router_user, the row token 3 reads)."""
    case = make_case(17, EDGE.T, EDGE.d_in, EDGE.d_out, EDGE.E, EDGE.K, EDGE.r, EDGE.r_u, EDGE.users, ("token", "user", "lora"))
    v = float(value)
    if where == "x":
        case["x"][2, 3] = v
    elif where == "router_user":
        u = int(case["user_ids"][3])
        case["router_user"][u if u >= 0 else EDGE.users, 1] = v
    else:
        case[where][1, 1] = v
    return case


SPECIALS = [("x", "nan")] + [(t, v) for t in ("router_x", "router_user", "router_h") for v in ("nan", "inf", "-inf")]


def empty_case(per_sequence):
    case = make_case(5, 6, EDGE.d_in, EDGE.d_out, EDGE.E, EDGE.K, EDGE.r, EDGE.r_u, EDGE.users, ("token", "user", "lora"),
                     per_sequence=per_sequence, seq_len=3 if per_sequence else 1)
    for n in ("x", "base_out", "user_ids"):
        case[n] = case[n][:0].clone()  # T = 0, with (empty) user ids
    return case
