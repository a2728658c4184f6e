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
