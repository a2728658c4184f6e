"""Shared checks of a backend's proper_linear against the float64 reference (used by the
Triton and the CUDA backend tests). Every check takes its tolerance from the caller: each
test states the tolerance of its dtype next to its case."""

import torch

from proper_kernels import reference

PARAMS = ("x", "base_out", "lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")


def poisoned_empty(*shape, device, dtype):
    """Stand-in for a kernel module's `_empty`: NaN (floats) or -7 (ints), so an element a
    kernel leaves unwritten fails the comparison."""
    t = torch.empty(*shape, device=device, dtype=dtype)
    return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(-7)


def cast(case, dtype, device):
    return {k: (v.to(device, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else
                v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check(case, dtype, device, fn, tol, extra_logit_grad=True):
    """Forward + all gradients of `fn` (a backend's proper_linear) vs the float64 reference
    on the same values: indices exact, the routing and y within `tol` (relative to the
    reference's largest magnitude), every gradient within 2 * tol."""
    low = cast(case, dtype, device)
    names = [n for n in PARAMS if low[n] is not None]
    ins = {n: low[n].clone().requires_grad_(True) for n in names}
    y, routing = fn(**dict(low, **ins))
    hi = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in low.items()}
    ins64 = {n: hi[n].clone().requires_grad_(True) for n in names}
    y64, routing64 = reference.proper_linear(**dict(hi, **ins64))

    assert y.dtype == dtype and y.shape == y64.shape
    # Slots whose gate underflows in fp32 (k close to E, large logits) may order differently;
    # they carry no weight. Every slot that matters must pick the same expert.
    weighty = routing64.gates > 1e-6
    assert torch.equal(routing.indices[weighty], routing64.indices[weighty])
    assert ((routing.indices >= 0) & (routing.indices < case["lora_A"].shape[0])).all()
    assert rel_err(routing.gates, routing64.gates) <= tol
    assert rel_err(routing.logits, routing64.logits) <= tol
    assert rel_err(y, y64) <= tol, rel_err(y, y64)

    g = torch.Generator().manual_seed(0)
    gy = torch.randn(y64.shape, generator=g, dtype=torch.float64).to(device)
    gl = torch.randn(routing64.logits.shape, generator=g, dtype=torch.float64).to(device)
    gg = torch.randn(routing64.gates.shape, generator=g, dtype=torch.float64).to(device)
    # The logits and the gates carry gradients of their own (a load-balance loss, a loss on
    # the routing) on every backend.
    loss64 = (y64 * gy).sum() + ((routing64.logits * gl).sum() + (routing64.gates * gg).sum() if extra_logit_grad else 0)
    loss = (y.double() * gy).sum() + ((routing.logits.double() * gl).sum() + (routing.gates.double() * gg).sum()
                                      if extra_logit_grad else 0)
    loss64.backward()
    loss.backward()
    for n in names:
        ref = ins64[n].grad
        if ref is None:  # not on the reference's graph (no user ids at all): a zero gradient
            assert ins[n].grad is None or torch.count_nonzero(ins[n].grad) == 0, n
            continue
        assert ins[n].grad is not None, n
        assert ins[n].grad.dtype == dtype
        err = rel_err(ins[n].grad, ref) if ref.abs().max() > 0 else ins[n].grad.abs().max().item()
        assert err <= tol * 2, (n, err)


# The Triton strategies' layouts a test runs under: (strategy, (WIDE_MAX_COLUMNS,
# WIDE_SHRINK_PER_SLOT) or None for the defaults). At the tests' small E*r the grouped
# strategy's defaults take its dense shrink; (4096, 0) its shrink per pair with a dense
# expand; (0, 0) its atomic one.
LAYOUTS = {
    "dense": ("dense", None),
    "grouped": ("grouped", None),
    "grouped-gathered": ("grouped", (4096, 0)),
    "grouped-atomic": ("grouped", (0, 0)),
}


def use_layout(layout, monkeypatch):
    """Set the grouped strategy's thresholds for `layout`; returns the strategy's name."""
    from proper_kernels import triton_grouped

    strategy, wide = LAYOUTS[layout]
    if wide is not None:
        monkeypatch.setattr(triton_grouped, "WIDE_MAX_COLUMNS", wide[0])
        monkeypatch.setattr(triton_grouped, "WIDE_SHRINK_PER_SLOT", wide[1])
    return strategy


def check_specials(got, want, tol, what, exact=True):
    """NaN wherever the reference has NaN (exact: nowhere else), the same infinities where
    both are not NaN, and the finite elements within tol of the reference."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, what
    gn, wn = got.isnan(), want.isnan()
    assert (gn | ~wn).all(), f"{what}: a NaN of the reference is missing"
    if exact:
        assert torch.equal(gn, wn), f"{what}: NaN where the reference has none"
    both = ~gn & ~wn
    assert torch.equal(got[both].isposinf(), want[both].isposinf()), f"{what}: +inf differs"
    assert torch.equal(got[both].isneginf(), want[both].isneginf()), f"{what}: -inf differs"
    fin = both & want.isfinite()
    if fin.any():
        err = rel_err(got[fin], want[fin])
        assert err <= tol, f"{what}: {err}"
    return wn


def check_indices(indices, num_experts, k):
    assert indices.dtype == torch.int64
    assert ((indices >= 0) & (indices < num_experts)).all(), "indices out of [0, E)"
    if k > 1:
        assert (indices.sort(dim=1).values.diff(dim=1) > 0).all(), "indices of a row must be distinct"


def run_with_reference(case, dtype, device, fn, train=True, **ref_kw):
    """`fn` (a backend's proper_linear) and the float64 reference on the same (cast) values.
    When `train`, also the backward of one loss with the same seeded random gradients into
    y, the logits and the gates; else fn runs under no_grad. Returns (y, routing, ins),
    (y64, routing64, ins64), with `ins` the differentiable inputs (empty unless train)."""
    low = cast(case, dtype, device)
    names = [n for n in PARAMS if low[n] is not None]
    hi = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in low.items()}
    ins64 = {n: hi[n].clone().requires_grad_(True) for n in names} if train else {}
    y64, routing64 = reference.proper_linear(**dict(hi, **ins64), **ref_kw)
    if not train:
        with torch.no_grad():
            y, routing = fn(**low)
        return (y, routing, {}), (y64, routing64, {})
    ins = {n: low[n].clone().requires_grad_(True) for n in names}
    y, routing = fn(**dict(low, **ins))
    g = torch.Generator().manual_seed(0)
    gy = torch.randn(y64.shape, generator=g, dtype=torch.float64).to(device)
    gl = torch.randn(routing64.logits.shape, generator=g, dtype=torch.float64).to(device)
    gg = torch.randn(routing64.gates.shape, generator=g, dtype=torch.float64).to(device)
    ((y64 * gy).sum() + (routing64.logits * gl).sum() + (routing64.gates * gg).sum()).backward()
    ((y.double() * gy).sum() + (routing.logits.double() * gl).sum() + (routing.gates.double() * gg).sum()).backward()
    return (y, routing, ins), (y64, routing64, ins64)


def check_special_grads(ins, ins64, dtype, tol, exact=True):
    """The gradients of an edge case: per token (x, base_out) NaN exactly where the
    reference has NaN (see check_specials); the weights, which sum over tokens, equal where
    both are finite (when exact)."""
    for n in ins:
        got, want = ins[n].grad, ins64[n].grad
        assert got is not None and got.dtype == dtype and got.shape == want.shape, n
        if n in ("x", "base_out"):
            check_specials(got, want, tol, f"d{n}", exact)
        elif exact:
            fin = got.isfinite() & want.isfinite()
            if fin.any():
                assert rel_err(got[fin], want[fin]) <= tol, n


def check_router_nan_and_inf(router_topk, value, dtype, device, tol):
    """A NaN or +-Inf logit (one element, and a whole row): gates and d logits NaN exactly
    where the reference has NaN and within tol elsewhere (2 tol for d logits); indices
    distinct, in range, and the reference's on the rows without NaN."""
    n, e, k = 70, 8, 3
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(n, e, generator=g, dtype=torch.float64).to(device, dtype)
    logits[2, 5] = float(value)
    logits[40, :] = float(value)
    dgates = torch.randn(n, k, generator=g, dtype=torch.float64).to(device, dtype)
    x = logits.clone().requires_grad_(True)
    gates, indices = router_topk(x, k, 0.7)
    gates.backward(dgates)
    x64 = logits.double().requires_grad_(True)
    gates64, indices64 = reference.router_topk(x64, k, 0.7)
    gates64.backward(dgates.double())
    assert gates.dtype == dtype
    check_indices(indices, e, k)
    nan_rows = check_specials(gates, gates64, tol, "gates").any(dim=1).to(gates.device)
    assert nan_rows[40] and nan_rows.sum() < n
    assert torch.equal(indices[~nan_rows], indices64[~nan_rows])
    check_specials(x.grad, x64.grad, tol * 2, "dlogits")


def check_router_zero_tokens(router_topk, dtype, device):
    x = torch.empty(0, 8, device=device, dtype=dtype).requires_grad_(True)
    gates, indices = router_topk(x, 2, 0.7)
    assert gates.shape == (0, 2) and gates.dtype == dtype
    assert indices.shape == (0, 2) and indices.dtype == torch.int64
    gates.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 8) and x.grad.dtype == dtype
