"""The Triton op reads its activations through their strides: a transposed or sliced x (and
x_lora), a sliced or transposed base_out, a non-contiguous dy and gradients of the gates and
logits, and weight views, give the result of the same call on contiguous copies and of the
float64 torch reference, forward and backward, for both strategies (every layout of the
grouped one). Every buffer the kernels write is NaN-filled first. On meta tensors the
recorded launches show the kernels get the strided views themselves (no copy of x, x_lora,
base_out or dy). Runs on a GPU, or under the Triton interpreter (TRITON_INTERPRET=1).
"""

import os

import pytest
import torch
from _helpers.kernels import LAYOUTS, poisoned_empty, use_layout

from proper_kernels import reference

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from proper_kernels import launch, triton_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# y and the routing against the float64 reference; gradients get twice this
TOL = {torch.float32: 2e-5, torch.float16: 1e-2}
# against the same call on contiguous inputs (the same kernels on the same values)
SAME = {torch.float32: 1e-6, torch.float16: 1e-3}
GRADS = ("x", "x_lora", "lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")

T, D_IN, D_OUT, E, K, R, R_U, USERS = 37, 20, 12, 6, 2, 4, 4, 5


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(triton_linear, "_empty", poisoned_empty)


def make_inputs(seed=0, separate_x=False):
    """Contiguous fp32 inputs of one call (per-token user ids, one token without a row)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    ids = torch.randint(0, USERS, (T,), generator=g)
    ids[3] = -1
    ins = dict(
        x=rnd(T, D_IN), base_out=rnd(T, D_OUT), lora_A=rnd(E, R, D_IN, scale=0.3), lora_B=rnd(E, D_OUT, R, scale=0.3),
        router_x=rnd(E, D_IN, scale=0.5), router_user=rnd(USERS + 1, E, scale=0.5), router_h=rnd(E, R_U, scale=0.5),
        user_A=rnd(USERS, R_U, D_IN, scale=0.3), user_B=rnd(USERS, D_OUT, R_U, scale=0.3),
    )
    if separate_x:
        ins["x_lora"] = rnd(T, D_IN)
    consts = dict(scaling=2.0, top_k=K, temperature=1.0, user_ids=ids, user_scaling=0.5)
    return ins, consts


def transposed(t):
    """t's values in a transposed layout (strides (1, rows))."""
    return t.t().contiguous().t()


def sliced(t, pad=5):
    """t's values as a column slice of a wider tensor (row stride past the width)."""
    wide = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    wide[:, 2:2 + t.shape[1]] = t
    return wide[:, 2:2 + t.shape[1]]


def every_other(t):
    """t's values at every other element of the last dimension of a wider tensor."""
    wide = torch.full(t.shape[:-1] + (2 * t.shape[-1],), float("nan"), dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def weight_views(t):
    """A weight view with t's values that is not contiguous."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() == 2 else every_other(t)


LAYOUTS_OF = {
    "x-transposed": dict(x=transposed),
    "x-sliced": dict(x=sliced, base_out=sliced),
    "x-every-other": dict(x=every_other),
    "base-transposed": dict(base_out=transposed),
    "x-lora-strided": dict(x=sliced, x_lora=transposed),
    "weights": {n: weight_views for n in ("lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A",
                                          "user_B")},
}


def run(ins, consts, strategy, dy_layout):
    """(y, logits, gates, indices, gradients) of one call, each input a leaf with the layout
    it came in; the loss's gradients of y, of the gates and of the logits arrive in
    `dy_layout` (a function of a contiguous tensor)."""
    params = {}
    for n, t in ins.items():
        leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
        leaf.copy_(t)
        params[n] = leaf.requires_grad_(n != "base_out")
    y, routing = triton_linear.proper_linear(**params, **consts, strategy=strategy)
    out = dict(y=y.detach(), logits=routing.logits.detach(), gates=routing.gates.detach(), indices=routing.indices)
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(y.shape, generator=g).to(y)
    gl = torch.randn(routing.logits.shape, generator=g).to(y)
    gg = torch.randn(routing.gates.shape, generator=g).to(y)
    loss = (y * dy_layout(gy)).sum() + (routing.logits * dy_layout(gl)).sum() + (routing.gates * dy_layout(gg)).sum()
    loss.backward()
    out.update({n: params[n].grad for n in GRADS if n in params})
    return out, params


def reference_of(ins, consts):
    hi = {n: t.detach().double().clone().requires_grad_(n != "base_out") for n, t in ins.items()}
    y, routing = reference.proper_linear(**hi, **consts)
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(y.shape, generator=g).double()
    gl = torch.randn(routing.logits.shape, generator=g).double()
    gg = torch.randn(routing.gates.shape, generator=g).double()
    ((y * gy).sum() + (routing.logits * gl).sum() + (routing.gates * gg).sum()).backward()
    out = dict(y=y.detach(), logits=routing.logits.detach(), gates=routing.gates.detach(), indices=routing.indices)
    out.update({n: hi[n].grad for n in GRADS if n in hi})
    return out


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def compare(got, want, tol, what):
    for n, w in want.items():
        assert n in got and got[n] is not None, f"{what}: no {n}"
        assert got[n].shape == w.shape, f"{what}: {n} shape"
        if n == "indices":
            assert torch.equal(got[n].cpu(), w.cpu()), f"{what}: indices"
            continue
        assert not got[n].isnan().any(), f"{what}: NaN in {n} (an element left unwritten)"
        t = tol if n in ("y", "logits", "gates") else 2 * tol
        assert rel_err(got[n], w) <= t, f"{what}: {n} off by {rel_err(got[n], w)}"


def cast(ins, dtype):
    return {n: t.to(DEVICE, dtype) for n, t in ins.items()}


def row_major(t):
    return t


def dy_transposed(t):
    return t.t().contiguous().t()


# fp32 runs every layout; fp16 the ones that between them cover every stride argument
WHICH_DTYPE = [(w, torch.float32) for w in LAYOUTS_OF] + [
    (w, torch.float16) for w in ("x-sliced", "x-lora-strided", "base-transposed", "weights")]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("which,dtype", WHICH_DTYPE, ids=[f"{w}-{str(d)[6:]}" for w, d in WHICH_DTYPE])
def test_strided_inputs_match_contiguous_and_reference(which, dtype, layout, monkeypatch):
    strategy = use_layout(layout, monkeypatch)
    ins, consts = make_inputs(separate_x=which == "x-lora-strided")
    ins = cast(ins, dtype)
    consts["user_ids"] = consts["user_ids"].to(DEVICE)
    strided = {n: LAYOUTS_OF[which].get(n, row_major)(t) for n, t in ins.items()}
    assert any(not t.is_contiguous() for t in strided.values())
    for n, t in strided.items():
        torch.testing.assert_close(t, ins[n], rtol=0, atol=0)
    dy_layout = dy_transposed if which in ("x-transposed", "base-transposed") else row_major
    got, params = run(strided, consts, strategy, dy_layout)
    for n, t in strided.items():  # the views went in as they are
        assert params[n].stride() == t.stride(), n
    plain, _ = run(ins, consts, strategy, row_major)
    compare(got, plain, SAME[dtype], f"{which} vs contiguous")
    want = reference_of(ins, consts)
    compare(got, want, TOL[dtype], f"{which} vs reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["dense", "grouped-atomic"])
def test_expanded_output_gradient(layout, dtype, monkeypatch):
    """loss = y.sum(): dy arrives as an expanded tensor (every stride 0)."""
    strategy = use_layout(layout, monkeypatch)
    ins, consts = make_inputs(seed=1)
    ins = cast(ins, dtype)
    consts["user_ids"] = consts["user_ids"].to(DEVICE)
    grads = []
    for expanded in (True, False):
        ps = {n: t.clone().requires_grad_(n != "base_out") for n, t in ins.items()}
        y, _ = triton_linear.proper_linear(**ps, **consts, strategy=strategy)
        (y.sum() if expanded else (y * torch.ones_like(y)).sum()).backward()
        grads.append({n: ps[n].grad for n in GRADS if n in ps})
    for n in grads[0]:
        assert not grads[0][n].isnan().any(), n
        assert rel_err(grads[0][n], grads[1][n]) <= SAME[dtype], n


@pytest.mark.parametrize("layout", ["dense", "grouped", "grouped-atomic"])
def test_in_place_into_a_strided_base_out(layout, monkeypatch):
    """The in-place op adds into a sliced base_out's own memory and leaves the rest alone."""
    strategy = use_layout(layout, monkeypatch)
    ins, consts = make_inputs(seed=2)
    ins = cast(ins, torch.float32)
    ids = consts["user_ids"].to(DEVICE)
    want, _ = triton_linear.proper_linear(**ins, **dict(consts, user_ids=ids), strategy=strategy)
    wide = torch.full((T, D_OUT + 6), 3.0, device=DEVICE)
    base = wide[:, 4:4 + D_OUT]
    base.copy_(ins["base_out"])
    plan = triton_linear.plan_for(ids, ins["x"], ins["user_A"], ins["router_user"])
    with torch.no_grad():
        torch.ops.proper.triton_linear_fwd_(
            ins["x"], ins["x"], base, plan.table, ins["lora_A"], ins["lora_B"], ins["router_x"], ins["router_user"],
            ins["router_h"], ins["user_A"], ins["user_B"], consts["scaling"], K, 1.0, consts["user_scaling"], True,
            strategy)
    assert rel_err(base, want) <= SAME[torch.float32]
    assert (wide[:, :4] == 3.0).all() and (wide[:, 4 + D_OUT:] == 3.0).all()


def test_the_kernels_get_the_views_themselves():
    """On meta tensors: the launches read x, x_lora, base_out and dy with the views' own
    strides, so none of them was copied on the way (the weights, contiguous, pass as they
    are too)."""
    m = dict(device="meta", dtype=torch.bfloat16)
    x = torch.empty(D_IN, 64, **m).t()  # [64, in], transposed
    xl = torch.empty(64, D_IN + 8, **m)[:, :D_IN]
    base = torch.empty(64, D_OUT + 4, **m)[:, 4:]
    dy = torch.empty(D_OUT, 64, **m).t()
    w = dict(lora_A=torch.empty(E, R, D_IN, **m), lora_B=torch.empty(E, D_OUT, R, **m),
             router_x=torch.empty(E, D_IN, **m), router_user=torch.empty(USERS + 1, E, **m),
             router_h=torch.empty(E, R_U, **m), user_A=torch.empty(USERS, R_U, D_IN, **m),
             user_B=torch.empty(USERS, D_OUT, R_U, **m))
    from proper_kernels.plan import build_plan

    for strategy in ("dense", "grouped"):
        with launch.recording("sm90") as launches:
            plan = build_plan(torch.empty(64, dtype=torch.long, device="meta"), torch.Size([64]),
                              torch.device("meta"), USERS)
            y, side = triton_linear._run_forward(x, xl, base, plan.table, *w.values(), 2.0, K, 1.0, 0.5, False,
                                                 strategy, True)
            n_fwd = len(launches)
            triton_linear._run_backward(dy, None, None, x, xl, plan.table, *w.values(), side[3], side[4], side[5],
                                        side[0], side[1], side[2], side[6], 2.0, K, 1.0, 0.5, False, plan.max_runs,
                                        strategy, [True] * 7, False)
        assert y.stride() == base.stride()  # written into base_out's own memory
        fwd, bwd = launches[:n_fwd], launches[n_fwd:]
        strides = lambda ln: {a.stride() for a in ln.args if isinstance(a, torch.Tensor)}  # noqa: E731
        shrink = next(ln for ln in fwd if ln.name == "_shrink")
        assert x.stride() in strides(shrink) and xl.stride() in strides(shrink)
        expand = next(ln for ln in fwd if ln.name == "_expand")
        assert base.stride() in strides(expand)
        for name in ("_bwd_dh", "_wgrad_out"):
            assert any(dy.stride() in strides(ln) for ln in bwd if ln.name == name), name
        assert any(xl.stride() in strides(ln) for ln in bwd if ln.name == "_wgrad_in")
        if strategy == "grouped":  # its shrink and weight gradients read x_lora and dy too
            assert all(xl.stride() in strides(ln) for ln in fwd if ln.name == "_shrink_wide")
            assert any(dy.stride() in strides(ln) for ln in bwd if ln.name == "_segment_gemm")
