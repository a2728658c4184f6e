"""The torch reference (the oracle of every kernel) against the naive loop, in float64."""

import zlib

import pytest
import torch

import proper_kernels
from proper_kernels import reference
from _helpers.cases import make_case
from _helpers.naive import naive_proper_linear

DT = torch.float64


def token_ids(case):
    x, ids = case["x"], case["user_ids"]
    if ids.shape == x.shape[:-1]:
        return ids.reshape(-1).tolist()
    per_seq = x.reshape(x.shape[0], -1, x.shape[-1]).shape[1]
    return ids.repeat_interleave(per_seq).tolist()


def run_naive(case):
    d_in = case["x"].shape[-1]
    y, chosen, gates = naive_proper_linear(
        case["x"].reshape(-1, d_in),
        case["base_out"].reshape(-1, case["base_out"].shape[-1]),
        case["lora_A"],
        case["lora_B"],
        case["scaling"],
        case["top_k"],
        case["temperature"],
        case["router_x"],
        case["router_user"],
        case["router_h"],
        token_ids(case),
        case["user_A"],
        case["user_B"],
        case["user_scaling"],
    )
    return y.reshape(case["base_out"].shape), chosen, gates


def run_reference(case):
    return reference.proper_linear(**case)


SOURCES = [(), ("token",), ("user",), ("lora",), ("token", "user"), ("token", "user", "lora")]
GRID = [
    # T, d_in, d_out, E, k, r, r_u
    (1, 5, 3, 1, 1, 1, 0),
    (1, 7, 9, 4, 2, 4, 3),
    (7, 6, 5, 4, 4, 2, 0),  # k = E
    (7, 6, 5, 1, 1, 4, 2),  # E = 1
    (13, 9, 11, 5, 2, 3, 4),
    (16, 4, 4, 3, 1, 1, 1),
]


@pytest.mark.parametrize("T,d_in,d_out,E,k,r,r_u", GRID)
@pytest.mark.parametrize("sources", SOURCES, ids=lambda s: "+".join(s) or "none")
def test_reference_matches_naive_loop(T, d_in, d_out, E, k, r, r_u, sources):
    case = make_case(zlib.crc32(repr((T, E, k, r, r_u, sources)).encode()), T, d_in, d_out, E, k, r, r_u, 5, sources)
    y, routing = run_reference(case)
    y_naive, chosen, gates = run_naive(case)
    torch.testing.assert_close(y, y_naive, rtol=1e-12, atol=1e-12)
    assert routing.indices.tolist() == chosen
    torch.testing.assert_close(routing.gates, torch.tensor(gates, dtype=DT), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cold", [True, False])
def test_per_sequence_ids_match_per_token_ids(cold):
    """One id per sequence ([B] for x [B, S, in]) equals the same ids spelled per token."""
    case = make_case(3, 12, 6, 7, 4, 2, 3, 2, 4, ("token", "user", "lora"), per_sequence=True, seq_len=4, cold=cold)
    y_seq, r_seq = run_reference(case)
    per_token = dict(case, user_ids=case["user_ids"][:, None].expand(case["x"].shape[:-1]).contiguous())
    y_tok, r_tok = run_reference(per_token)
    torch.testing.assert_close(y_seq, y_tok, rtol=1e-13, atol=1e-13)
    assert torch.equal(r_seq.indices, r_tok.indices)
    y_naive, _, _ = run_naive(case)
    torch.testing.assert_close(y_seq, y_naive, rtol=1e-12, atol=1e-12)


def test_unknown_user_takes_the_group_path_and_default_row():
    """Id -1: no user LoRA, no LoRA-aware term, router_user's last row."""
    case = make_case(5, 4, 5, 6, 3, 2, 2, 3, 4, ("token", "user", "lora"))
    case["user_ids"] = torch.full((4,), -1)
    y, routing = run_reference(case)
    no_bank = dict(case, user_A=None, user_B=None, router_h=None, user_ids=None)
    y2, routing2 = run_reference(no_bank)  # no ids at all: everyone is a user without a row
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    expected_logits = case["x"] @ case["router_x"].t() + case["router_user"][-1]
    torch.testing.assert_close(routing.logits, expected_logits, rtol=1e-14, atol=1e-14)


def test_ties_go_to_the_lower_expert_index():
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5], [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=DT)
    gates, idx = reference.router_topk(logits, 2)
    assert idx.tolist() == [[1, 2], [0, 1]]
    torch.testing.assert_close(gates, torch.full((2, 2), 0.5, dtype=DT))
    # No router at all: every token goes to experts 0..k-1 with equal gates.
    case = make_case(1, 3, 4, 4, 5, 3, 2, 0, 2, ())
    assert run_reference(case)[1].indices.tolist() == [[0, 1, 2]] * 3


@pytest.mark.parametrize("k", [1, 2, 4])
def test_router_topk_against_sorting_by_hand(k):
    logits = torch.randn(9, 4, dtype=DT)
    gates, idx = proper_kernels.router_topk(logits, k, temperature=0.5, backend="torch")
    p = torch.softmax(logits / 0.5, -1)
    for t in range(9):
        order = sorted(range(4), key=lambda e: (-float(p[t, e]), e))[:k]
        assert idx[t].tolist() == order
        torch.testing.assert_close(gates[t], p[t, order] / p[t, order].sum())
    torch.testing.assert_close(gates.sum(-1), torch.ones(9, dtype=DT))


def test_dispatcher_torch_backend_equals_reference():
    case = make_case(11, 7, 6, 5, 4, 2, 3, 2, 4, ("token", "user", "lora"))
    args = dict(case)
    y_ref, _ = reference.proper_linear(**args)
    y = proper_kernels.proper_linear(**args, backend="torch")
    assert torch.equal(y, y_ref)
    assert proper_kernels.last_backend() == "torch"


@pytest.mark.parametrize(
    "T,E,k,r_u,sources",
    [
        (1, 1, 1, 0, ()),
        (3, 3, 2, 2, ("token", "user", "lora")),
        (4, 3, 3, 2, ("token", "lora")),
        (2, 4, 1, 0, ("token", "user")),
    ],
)
def test_gradcheck_every_input(T, E, k, r_u, sources):
    """Finite differences against autograd for x, base_out, both LoRAs, routers and the bank."""
    case = make_case(7 + T * E, T, 4, 3, E, k, 2, r_u, 3, sources)
    names = [n for n in ("x", "base_out", "lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B") if case[n] is not None]
    inputs = tuple(case[n].clone().requires_grad_(True) for n in names)

    def fn(*tensors):
        return reference.proper_linear(**dict(case, **dict(zip(names, tensors))))[0]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradients_reach_only_the_users_in_the_batch():
    case = make_case(2, 6, 4, 3, 3, 2, 2, 2, 6, ("token", "user", "lora"), cold=False)
    case["user_ids"] = torch.tensor([1, 1, 4, -1, 4, 1])
    params = {n: case[n].clone().requires_grad_(True) for n in ("user_A", "user_B", "router_user")}
    y, _ = reference.proper_linear(**dict(case, **params))
    y.square().sum().backward()
    for n in ("user_A", "user_B"):
        g = params[n].grad
        assert g[[1, 4]].abs().sum() > 0
        assert torch.count_nonzero(g[[0, 2, 3, 5]]) == 0
    g = params["router_user"].grad
    assert torch.count_nonzero(g[[0, 2, 3, 5]]) == 0 and g[[1, 4, 6]].abs().sum() > 0  # row 6: id -1


def test_float32_and_bfloat16_follow_float64():
    case = make_case(4, 9, 8, 6, 4, 2, 3, 2, 4, ("token", "user", "lora"))
    y64, r64 = run_reference(case)
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        low = {k: (v.to(dt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in case.items()}
        y, r = run_reference(low)
        assert y.dtype == dt
        if torch.equal(r.indices, r64.indices):  # near-ties may legitimately flip in low precision
            torch.testing.assert_close(y.to(DT), y64, rtol=tol, atol=tol * y64.abs().max().item())


@pytest.mark.parametrize("seed", range(3))
def test_random_shapes(seed):
    g = torch.Generator().manual_seed(100 + seed)
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    E = ri(1, 6)
    sources = tuple(s for s in ("token", "user", "lora") if ri(0, 1))
    case = make_case(seed, ri(1, 20), ri(1, 12), ri(1, 12), E, ri(1, E), ri(1, 5), ri(0, 4), ri(1, 5), sources)
    y, routing = run_reference(case)
    y_naive, chosen, _ = run_naive(case)
    torch.testing.assert_close(y, y_naive, rtol=1e-12, atol=1e-12)
    assert routing.indices.tolist() == chosen


@pytest.mark.parametrize("T,d_in,d_out,E,k,r,r_u", [GRID[1], GRID[3], GRID[4]])
@pytest.mark.parametrize("sources", [(), ("token", "user", "lora")], ids=lambda s: "+".join(s) or "none")
@pytest.mark.parametrize("scaling", [1.7, 0.0])
def test_inplace_and_group_off_match_the_naive_loop(T, d_in, d_out, E, k, r, r_u, sources, scaling):
    case = make_case(zlib.crc32(repr((T, E, r_u, sources, "inplace")).encode()), T, d_in, d_out, E, k, r, r_u, 5,
                     sources)
    case["scaling"] = scaling
    y_naive, chosen, _ = run_naive(case)
    before = case["base_out"].clone()
    y, routing = reference.proper_linear(**case)  # out of place: base_out untouched
    assert torch.equal(case["base_out"], before)
    torch.testing.assert_close(y, y_naive, rtol=1e-12, atol=1e-12)
    assert routing.indices.tolist() == chosen
    y2, _ = reference.proper_linear(**case, inplace=True)  # into base_out's memory
    assert y2.data_ptr() == case["base_out"].data_ptr()
    torch.testing.assert_close(y2, y_naive, rtol=1e-12, atol=1e-12)
    # the dispatcher passes inplace on to the torch backend
    case["base_out"] = before.clone()
    y3 = proper_kernels.proper_linear(**case, inplace=True, backend="torch")
    assert y3.data_ptr() == case["base_out"].data_ptr()
    torch.testing.assert_close(y3, y_naive, rtol=1e-12, atol=1e-12)


def test_inplace_gradients_equal_out_of_place_gradients():
    case = make_case(11, 12, 6, 5, 4, 2, 3, 2, 4, ("token", "user", "lora"), per_sequence=True, seq_len=3)
    W = torch.randn(5, 6, dtype=DT)
    grads = []
    for inplace in (False, True):
        leaves = {n: case[n].clone().requires_grad_(True) for n in ("x", "lora_A", "lora_B", "router_x",
                                                                      "router_user", "router_h", "user_A", "user_B")}
        args = {**case, **leaves}
        args["base_out"] = leaves["x"] @ W.t()  # a linear layer's output, as in ProperLinear
        y, _ = reference.proper_linear(**args, inplace=inplace)
        (y * torch.linspace(-1, 1, y.numel(), dtype=DT).reshape(y.shape)).sum().backward()
        grads.append({n: t.grad for n, t in leaves.items()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-12, atol=1e-12, msg=n)
