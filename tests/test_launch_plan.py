"""The Triton launch plan, recorded from the real host code on meta tensors: what a GPU
would get (grids, configurations, bytes), and proof that the host code never syncs."""

import os

import pytest
import torch

from proper_kernels import compile_check, cost, launch, triton_linear
from proper_kernels.plan import build_plan


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_prefill_forward_moves_at_most_1_1x_its_floor(dtype):
    rep = cost.plan_report(cost.case("prefill"), dtype, "sm90")
    assert rep["forward_vs_floor"] <= 1.1, rep["forward_vs_floor"]
    # x is read once: the shrink reads it, nothing else does; base_out and y once, in the expand
    names = [r["kernel"] for r in rep["forward"]]
    assert names == ["_shrink", "_expand"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_prefill_forward_moves_at_most_1_1x_its_floor(dtype):
    rep = cost.plan_report(cost.case("prefill"), dtype, "sm90", backend="cuda")
    assert rep["forward_vs_floor"] <= 1.1, rep["forward_vs_floor"]
    assert [r["kernel"] for r in rep["forward"]] == ["prefill_shrink", "prefill_expand"]
    assert rep["forward"][0]["ctas"] == 128 and rep["forward"][1]["ctas"] == 128 * 32


def test_cuda_plan_model_uses_the_kernels_tile_sizes():
    """record_cuda_call models C++ launchers; its tiles must be the ones csrc/ uses."""
    import re
    from pathlib import Path

    src = (Path(cost.__file__).parent.parent / "csrc")
    tc, pf = (src / "tc.cuh").read_text(), (src / "prefill.cuh").read_text()
    assert re.search(r"constexpr int kTileM = 64;", tc)
    assert re.search(r"constexpr int kOutTile = 128;", pf)
    assert re.search(r"constexpr int kMaxCols = 256;", pf)
    fwd, bwd = cost.record_cuda_call(cost.case("prefill"))
    assert [ln.grid for ln in fwd] == [(128,), (128, 32)]
    assert [ln.grid for ln in bwd[:2]] == [(128,), (128, 32)]


@pytest.mark.parametrize("target,sms", [("sm90", 132), ("sm80", 108)])
def test_decode_shrink_and_expand_launch_a_cta_per_sm(target, sms):
    fwd, _ = cost.record_call(cost.case("decode"), "bfloat16", target)
    grids = {ln.name: ln.grid for ln in fwd}
    ctas = lambda g: g[0] * (g[1] if len(g) > 1 else 1)  # noqa: E731
    assert ctas(grids["_shrink"]) >= sms and ctas(grids["_expand"]) >= sms
    assert grids["_shrink"][1] > 1  # split-K


def test_prefill_tiles_are_64_tokens_tall_for_wgmma():
    fwd, bwd = cost.record_call(cost.case("prefill"), "bfloat16", "sm90")
    for ln in fwd + bwd:
        if hasattr(ln, "consts") and "BLOCK_T" in ln.consts and ln.name != "_route":
            assert ln.consts["BLOCK_T"] >= 64, ln.name


def meta_call(T=40, d_in=48, d_out=24, E=4, k=2, r=4, r_u=3, n_users=9, per_token=True, strategy="dense",
              separate_x=False, compact=False, routers=(True, True, True), target="sm90"):
    m = dict(device="meta", dtype=torch.bfloat16)
    x = torch.empty(T, d_in, **m)
    xl = torch.empty(T, d_in, **m) if separate_x else x
    A, B = torch.empty(E, r, d_in, **m), torch.empty(E, d_out, r, **m)
    wx = torch.empty(E, d_in, **m) if routers[0] else None
    ru = torch.empty(n_users + 1, E, **m) if routers[1] else None
    wh = torch.empty(E, r_u, **m) if routers[2] and r_u else None
    ua = torch.empty(n_users, r_u, d_in, **m) if r_u else None
    ub = torch.empty(n_users, d_out, r_u, **m) if r_u else None
    ids = torch.empty(T if per_token else 4, dtype=torch.long, device="meta")
    lead = torch.Size([T]) if per_token else torch.Size([4, T // 4])
    needs = {n: True for n in ("lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")}
    with launch.recording(target) as launches:
        plan = build_plan(ids, lead, torch.device("meta"), n_users)
        s = triton_linear._Call(x, A, B, k, r_u, strategy)
        y, side = triton_linear.forward(s, x, xl, torch.empty(T, d_out, **m), plan.table, A, B, 2.0, 1.0, wx, ru, wh,
                                        ua, ub, 0.5)
        grads = triton_linear.backward(s, torch.empty_like(y), torch.empty(T, k, device="meta"),
                                       torch.empty(T, E, device="meta"), side, x, xl, plan.table, plan.max_runs, A,
                                       B, 2.0, 1.0, wx, ru, wh, ua, ub, 0.5, needs, compact)
    return launches, grads


@pytest.mark.parametrize("kw", [
    dict(), dict(per_token=False), dict(strategy="grouped", E=16, r=16, k=4), dict(separate_x=True),
    dict(compact=True, n_users=1000), dict(r_u=0), dict(routers=(False, False, False)), dict(T=1), dict(T=3000, target="sm80"),
], ids=["per-token", "per-sequence", "grouped", "dropout-x", "sparse-bank", "no-bank", "no-router", "T=1",
        "prefill-sm80"])
def test_forward_and_backward_host_code_never_syncs(kw):
    """On meta tensors any value read back to the host raises: the whole host side of the
    forward and the backward runs, so it reads nothing back."""
    launches, grads = meta_call(**kw)
    assert launches and all(ln.bytes > 0 for ln in launches)
    assert grads["x"] is not None
    if kw.get("compact"):
        assert grads["user_A"].shape[0] == 40  # one row per run of the batch (<= T), not 1000 bank rows


def test_compile_gate_reads_dot_kinds_from_the_ttgir():
    ttgir = "\n".join([
        "%a = ttng.warp_group_dot %x, %w, %acc {isAsync = true} : !ttg.memdesc<64x64xbf16, #shared, #smem> * "
        "!ttg.memdesc<64x128xbf16, #shared1, #smem> -> tensor<64x128xf32, #mma1>",
        "%b:3 = ttng.warp_group_dot_wait %a, %x, %w {pendings = 0 : i32} : tensor<64x128xf32, #mma1>",
        "%c = tt.dot %p, %q, %r : tensor<16x64xf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>> * "
        "tensor<64x16xf16, #ttg.dot_op<{opIdx = 1, parent = #mma, kWidth = 2}>> -> tensor<16x16xf32, #mma>",
        "%d = tt.dot %p, %q, %r : tensor<16x64xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * "
        "tensor<64x16xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<16x16xf32, #blocked>",
    ])
    assert compile_check._dots(ttgir) == [("wgmma", "bf16"), ("mma", "f16"), ("fma", "f32")]


def test_compile_gate_fails_spills_fma_dots_shared_memory_and_missing_wgmma():
    ok = dict(kernel="_shrink", case="prefill", dtype="bfloat16", target="sm90", regs=200, stack=0, local=0,
              shared=1000, dots=[("wgmma", "bf16")])
    assert compile_check.problems(ok) == []
    assert compile_check.problems(dict(ok, stack=16))
    assert compile_check.problems(dict(ok, local=4))
    assert compile_check.problems(dict(ok, shared=300000))
    assert compile_check.problems(dict(ok, dots=[("fma", "bf16")]))
    assert compile_check.problems(dict(ok, dtype="float32", dots=[("fma", "f32")])) == []  # IEEE fp32
    assert compile_check.problems(dict(ok, dots=[("mma", "bf16")]))  # prefill on sm_90: wgmma
    assert compile_check.problems(dict(ok, target="sm80", dots=[("mma", "bf16")])) == []
    assert compile_check.problems(dict(ok, error="boom"))


def test_bench_plan_prints_every_goal_case(capsys):
    from proper.apps.bench import main

    assert main(["--plan", "--case", "prefill", "--case", "decode"]) == 0
    out = capsys.readouterr().out
    assert "### prefill" in out and "### decode" in out and "roofline" in out


def test_goal_benchmark_script_runs(tmp_path):
    """benchmarks.goals is for a GPU; --smoke runs its code on tiny CPU shapes."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.goals", "--smoke", "--out", str(tmp_path)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = next(tmp_path.glob("goals-smoke-*.md")).read_text()
    assert "prefill-smoke" in md and "decode-smoke" in md


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bank_grad_per_sequence_matches_a_loop(dtype):
    """The CUDA backend's bank-row gradients (one bmm in the data's dtype) against a loop."""
    from proper_kernels._common import bank_grad

    g = torch.Generator().manual_seed(0)
    left = torch.randn(12, 3, generator=g)
    right = torch.randn(12, 5, generator=g).to(dtype)
    uid = torch.tensor([2, 2, 2, -1, -1, -1, 0, 0, 0, 2, 2, 2])
    got = bank_grad(left, right, uid, 4, 3)
    want = torch.zeros(3, 3, 5, dtype=torch.float64)
    for s in range(4):
        u = int(uid[3 * s])
        if u >= 0:
            want[u] += left[3 * s:3 * s + 3].double().t() @ right[3 * s:3 * s + 3].double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.double() - want).abs().max() <= tol * want.abs().max()
    assert torch.count_nonzero(got[1]) == 0


def test_gpu_check_harness_runs_on_the_cpu():
    """benchmarks.gpu_check (the compute-sanitizer script) on the torch reference: its own
    comparison code must report ~0 error, and a wrong function must fail it."""
    import importlib

    gc = importlib.import_module("benchmarks.gpu_check")
    from proper_kernels import reference

    case = gc.make_case("cpu")
    errs = gc.errors(reference.proper_linear, case, torch.float32)
    assert set(errs) == {"y", *gc.TRAINED} and gc.report("ref", errs, 1e-5)
    assert gc.report("ref", gc.errors(reference.proper_linear, case, torch.float32, train=False), 1e-5)

    def wrong(**kw):
        y, routing = reference.proper_linear(**kw)
        return y * 1.01, routing

    assert not gc.report("wrong", gc.errors(wrong, case, torch.float32, train=False), 1e-4)
