"""The launch plan of the fused op with its cost, known before any GPU runs.

For a call shape (``Case``), :func:`record_call` runs the real host code of the Triton
forward and backward on ``meta`` tensors inside ``launch.recording``: the launches, grids
and configurations a GPU would get. Each launch carries the HBM bytes it moves (every
tensor it touches once; weights read again by other programs are taken to come from L2)
and the FLOPs it does (side buffers and weights that several programs re-read are taken to
come from L2 after the first read). :func:`plan_report` adds the roofline time of each on an H100 SXM
(989 TFLOP/s dense bf16, 3.35 TB/s HBM3; an A100 for sm_80) and sets them beside a plain ``nn.Linear`` of the
same shape and beside the floor of the op: x read once, base_out read once and y written
once, the adapters (and the bank rows of the users present) read once.

``proper bench --plan`` prints it for the goal cases. These are predictions from a
roofline, not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

H100 = dict(name="H100 SXM", tensor_flops=989e12, fp32_flops=67e12, bandwidth=3.35e12)
A100 = dict(name="A100 SXM", tensor_flops=312e12, fp32_flops=19.5e12, bandwidth=2.04e12)
GPUS = {"sm90": H100, "sm80": A100}


@dataclass(frozen=True)
class Case:
    name: str
    T: int
    d_in: int
    d_out: int
    E: int
    k: int
    r: int
    r_u: int
    users: int  # distinct users in the batch
    per_token: bool  # ids per token (decode) or per sequence
    prefill: bool  # whether sm_90 must run the expert and user dots as wgmma


CASES = (
    Case("prefill", 8192, 4096, 4096, 8, 2, 16, 16, 8, False, True),
    Case("decode", 64, 4096, 4096, 8, 2, 16, 16, 64, True, False),
    Case("down-proj", 8192, 11008, 4096, 8, 2, 16, 16, 8, False, True),
    Case("E64-k8", 8192, 4096, 4096, 64, 8, 16, 16, 8, False, False),
    Case("rank4", 8192, 4096, 4096, 8, 2, 4, 4, 8, False, True),
    # past triton_grouped.WIDE_MAX_COLUMNS: the grouped strategy's atomic expand and dx
    Case("E256-k2", 8192, 4096, 4096, 256, 2, 16, 16, 8, False, False),
)


def case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def record_call(c: Case, dtype_name: str = "bfloat16", target: str = "sm90") -> tuple[list, list]:
    """(forward launches, backward launches) of one call of the fused op on the Triton
    backend, with every router and the user bank on, recorded on meta tensors."""
    import torch

    from . import launch, triton_linear
    from .plan import build_plan

    dtype = getattr(torch, dtype_name)
    meta = dict(device="meta", dtype=dtype)
    n_users = max(c.users, 1) * 4
    x = torch.empty(c.T, c.d_in, **meta)
    base = torch.empty(c.T, c.d_out, **meta)
    A = torch.empty(c.E, c.r, c.d_in, **meta)
    B = torch.empty(c.E, c.d_out, c.r, **meta)
    wx = torch.empty(c.E, c.d_in, **meta)
    ru = torch.empty(n_users + 1, c.E, **meta)
    wh = torch.empty(c.E, c.r_u, **meta)
    ua = torch.empty(n_users, c.r_u, c.d_in, **meta)
    ub = torch.empty(n_users, c.d_out, c.r_u, **meta)
    ids = torch.empty(c.T if c.per_token else c.users, dtype=torch.long, device="meta")
    lead = torch.Size([c.T]) if c.per_token else torch.Size([c.users, c.T // c.users])
    needs = {n: True for n in ("lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")}
    with launch.recording(target) as launches:
        plan = build_plan(ids, lead, torch.device("meta"), n_users)
        s = triton_linear._Call(x, A, B, c.k, c.r_u, triton_linear.choose_strategy(c.E, c.r))
        y, side = triton_linear.forward(s, x, x, base, plan.table, A, B, 2.0, 1.0, wx, ru, wh, ua, ub, 1.0,
                                        bank_rows=min(c.users, n_users))
        n_fwd = len(launches)
        triton_linear.backward(s, torch.empty_like(y), torch.empty(c.T, c.k, device="meta"), None, side, x, x,
                               plan.table, plan.max_runs, A, B, 2.0, 1.0, wx, ru, wh, ua, ub, 1.0, needs, False)
    return launches[:n_fwd], launches[n_fwd:]


def record_cuda_call(c: Case, dtype_name: str = "bfloat16", target: str = "sm90") -> tuple[list, list]:
    """(forward launches, backward launches) of one call on the CUDA backend's tensor-core
    path (csrc/prefill.cuh; proper_kernels/cuda_backend.py), with every router and the user
    bank on. The CUDA launchers are C++, so this is their model, kept beside them: the grids
    are the launchers' (64-token tiles; 128 outputs or inputs per CTA), and the bytes count
    each tensor a kernel touches once, as for the Triton records (weights and side buffers
    that other CTAs re-read come from L2). Decode shapes run the decode kernels instead."""
    from .cuda_backend import _pad8
    from .launch import External

    b = _size(dtype_name)
    T, i, o, E, k, r, ru, U = c.T, c.d_in, c.d_out, c.E, c.k, c.r, c.r_u, c.users
    er = E * r
    tiles = -(-T // 64)
    runs = tiles + U  # user runs met by the tiles: one per tile, plus one more per user boundary
    bank_in, bank_out = U * ru * i * b, U * ru * o * b
    plan = 8 * T

    def rec(name, grid, nbytes, flops, note):
        return External(name, int(nbytes), int(flops), grid, note)

    cols = _pad8(er) + _pad8(E)
    fwd = [
        rec("prefill_shrink", (tiles,),
            b * T * i + b * (er + E) * i + bank_in + b * U * E + b * E * ru + 3 * plan
            + T * (4 * er + b * er + 4 * ru + 4 * E + 12 * k),
            2 * T * i * cols + 2 * 64 * runs * i * _pad8(ru),
            "h = x A_all^T, logits = x W_x^T, h_u per user run (mma.sync); routing in the epilogue"),
        rec("prefill_expand", (tiles, -(-o // 128)),
            b * T * er + 4 * T * ru + 2 * b * T * o + b * er * o + bank_out + 2 * plan,
            2 * T * o * er + 2 * 64 * runs * o * ru,
            "y = base + s_g (g h) B_all + s_u h_u B^u (mma.sync), in place"),
    ]
    bwd = [
        rec("prefill_bwd_dh", (tiles,),
            b * T * o + b * er * o + bank_out + b * E * ru + 3 * plan
            + T * (4 * er + 4 * E + 4 * k + 8 * k + 4 * k) + T * (b * er + 4 * E + 4 * ru),
            2 * T * o * _pad8(er) + 2 * 64 * runs * o * _pad8(ru),
            "d(g h) = s_g dy B_all, dh_u per run (mma.sync); router backward in the epilogue"),
        rec("prefill_bwd_dx", (tiles, -(-i // 128)),
            T * (b * er + 4 * E + 4 * ru) + b * (er + E) * i + bank_in + 2 * plan + b * T * i,
            2 * T * i * (er + E) + 2 * 64 * runs * i * ru,
            "dx = dh A_all + dlogits W_x + dh_u A^u (mma.sync)"),
        rec("dA, dW_x", (), b * T * (er + E + i) + 4 * T * E + b * (er + E) * i, 2 * T * (er + E) * i,
            "[dh | dlogits]^T x, one GEMM (cuBLAS)"),
        rec("dB", (), b * T * (o + er) + b * er * o, 2 * T * er * o, "dy^T (g h) (cuBLAS)"),
        rec("d router_user, d W_h", (), 4 * T * E * 2 + 4 * T * ru, 2 * T * E * ru, "index_add, GEMM"),
        rec("d user_A", (), (4 + 2 * b) * T * ru + b * T * i + 4 * U * ru * i * 2, 2 * T * ru * i,
            "per-sequence bmm of dh_u and x (cuBLAS)"),
        rec("d user_B", (), b * T * o + (4 + 2 * b) * T * ru + 4 * U * ru * o * 2, 2 * T * ru * o,
            "per-sequence bmm of dy and h_u (cuBLAS)"),
    ]
    return fwd, bwd


def _size(dtype_name: str) -> int:
    return 4 if dtype_name == "float32" else 2


def floor_bytes(c: Case, dtype_name: str = "bfloat16") -> dict:
    """The bytes the op cannot avoid per call: forward (x, base_out, y, the adapters and the
    present users' bank rows, once) and backward (dy, x, dx, and the adapters and their
    gradients, once)."""
    b = _size(dtype_name)
    adapters = b * (c.E * c.r * (c.d_in + c.d_out) + c.E * c.d_in + c.E * c.r_u) + b * c.users * (
        c.r_u * (c.d_in + c.d_out) + c.E)
    fwd = b * c.T * (c.d_in + 2 * c.d_out) + adapters
    bwd = b * c.T * (c.d_out + 2 * c.d_in) + 2 * adapters
    return dict(forward=fwd, backward=bwd)


def roofline_s(nbytes: float, flops: float, dtype_name: str = "bfloat16", gpu: dict = H100) -> float:
    peak = gpu["fp32_flops"] if dtype_name == "float32" else gpu["tensor_flops"]
    return max(nbytes / gpu["bandwidth"], flops / peak)


def linear_cost(c: Case, dtype_name: str = "bfloat16") -> dict:
    """A plain nn.Linear(in, out) on the same tokens: forward, and backward with a frozen
    weight (dx only) and with a trained one (dx and dW)."""
    b = _size(dtype_name)
    T, i, o = c.T, c.d_in, c.d_out
    fwd = (b * (T * i + i * o + T * o), 2 * T * i * o)
    dx = (b * (T * o + i * o + T * i), 2 * T * i * o)
    dw = (b * (T * o + T * i + i * o), 2 * T * i * o)
    return dict(forward=fwd, dx=dx, dw=dw)


def naive_loop_cost(c: Case, dtype_name: str = "bfloat16") -> tuple[int, int]:
    """(bytes, FLOPs) of the loop users write today, after the base GEMM: per expert, its
    LoRA on all tokens (x read, y read and written) masked by the gates; per user present,
    the same for the user's LoRA on its tokens."""
    b = _size(dtype_name)
    per_expert = b * c.T * (c.d_in + 2 * c.d_out) + b * c.r * (c.d_in + c.d_out)
    users = b * c.T * (c.d_in + 2 * c.d_out) + b * c.users * c.r_u * (c.d_in + c.d_out)
    flops = 2 * c.T * (c.E * c.r + c.r_u) * (c.d_in + c.d_out)
    return c.E * per_expert + users, flops


def plan_report(c: Case, dtype_name: str = "bfloat16", target: str = "sm90", gpu: dict = H100,
                backend: str = "triton") -> dict:
    """Launches with bytes, FLOPs and roofline time, the totals, the floor and the ratios."""
    fwd, bwd = (record_cuda_call if backend == "cuda" else record_call)(c, dtype_name, target)

    def rows(launches):
        out = []
        for ln in launches:
            grid = getattr(ln, "grid", ())
            ctas = 1
            for g in grid:
                ctas *= g
            out.append(dict(kernel=ln.name, note=ln.note, grid="x".join(map(str, grid)) or "-",
                            ctas=ctas if grid else None, bytes=ln.bytes, flops=ln.flops,
                            time_s=roofline_s(ln.bytes, ln.flops, dtype_name, gpu)))
        return out

    f_rows, b_rows = rows(fwd), rows(bwd)
    floor = floor_bytes(c, dtype_name)
    lin = linear_cost(c, dtype_name)
    lin_t = {k: roofline_s(*v, dtype_name, gpu) for k, v in lin.items()}
    f_time = sum(r["time_s"] for r in f_rows)
    b_time = sum(r["time_s"] for r in b_rows)
    f_bytes = sum(r["bytes"] for r in f_rows)
    b_bytes = sum(r["bytes"] for r in b_rows)
    layer_fwd = lin_t["forward"] + f_time  # the frozen base GEMM, then the fused op
    naive_t = lin_t["forward"] + roofline_s(*naive_loop_cost(c, dtype_name), dtype_name, gpu)
    layer_fb = lin_t["forward"] + lin_t["dx"] + f_time + b_time
    return dict(
        case=c, dtype=dtype_name, target=target, gpu=gpu["name"], backend=backend, forward=f_rows, backward=b_rows,
        forward_bytes=f_bytes, backward_bytes=b_bytes, floor=floor,
        forward_vs_floor=f_bytes / floor["forward"], backward_vs_floor=b_bytes / floor["backward"],
        linear_s=lin_t, op_forward_s=f_time, op_backward_s=b_time,
        layer_forward_vs_linear=layer_fwd / lin_t["forward"],
        naive_forward_vs_layer=naive_t / layer_fwd,
        layer_train_vs_frozen_linear=layer_fb / (lin_t["forward"] + lin_t["dx"]),
        layer_train_vs_trained_linear=layer_fb / (lin_t["forward"] + lin_t["dx"] + lin_t["dw"]),
        sms={"sm90": 132, "sm80": 108}[target],
    )


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def _us(s: float) -> str:
    return f"{s * 1e6:.1f}"


def markdown(reports: list[dict]) -> str:
    """The plans as markdown tables, one per case, and a summary against the goals."""
    lines = []
    for rep in reports:
        c = rep["case"]
        lines += [f"### {c.name}: T={c.T}, in={c.d_in}, out={c.d_out}, E={c.E}, k={c.k}, r={c.r}, r_u={c.r_u}, "
                  f"{c.users} users ({'ids per token' if c.per_token else 'ids per sequence'}), {rep['dtype']}, "
                  f"{rep['target']}", "",
                  "| pass | launch | grid (CTAs) | MB moved | GFLOP | roofline us |", "|---|---|---|---|---|---|"]
        for name, rs in (("forward", rep["forward"]), ("backward", rep["backward"])):
            for r in rs:
                ctas = f" ({r['ctas']})" if r["ctas"] else ""
                lines.append(f"| {name} | {r['kernel']}: {r['note']} | {r['grid']}{ctas} | {_mb(r['bytes'])} | "
                             f"{r['flops'] / 1e9:.2f} | {_us(r['time_s'])} |")
        lin = rep["linear_s"]
        gpu = GPUS[rep["target"]]
        bound = [r for r in rep["forward"] if r["bytes"] / gpu["bandwidth"] >= r["flops"] / gpu["tensor_flops"]]
        big = [r for r in rep["forward"] if r["ctas"] and r["bytes"] >= 0.2 * rep["forward_bytes"]]
        fewest = min((r["ctas"] for r in big), default=0)
        lines += ["",
                  f"- {len(bound)} of {len(rep['forward'])} forward launches are memory-bound at the roofline; the "
                  f"launches that move most of the bytes run at least {fewest} CTAs on {rep['sms']} SMs "
                  "(the bandwidth goal needs every SM busy).",
                  f"- forward moves {_mb(rep['forward_bytes'])} MB, {rep['forward_vs_floor']:.3f}x its floor of "
                  f"{_mb(rep['floor']['forward'])} MB (x once, base_out and y once, the adapters once); backward "
                  f"{_mb(rep['backward_bytes'])} MB, {rep['backward_vs_floor']:.3f}x its floor of "
                  f"{_mb(rep['floor']['backward'])} MB.",
                  f"- plain nn.Linear: forward {_us(lin['forward'])} us, dx {_us(lin['dx'])} us, dW {_us(lin['dw'])} us; "
                  f"the fused op adds {_us(rep['op_forward_s'])} us forward and {_us(rep['op_backward_s'])} us "
                  "backward.",
                  f"- predicted layer forward (base GEMM + fused op) / nn.Linear forward: "
                  f"{rep['layer_forward_vs_linear']:.2f}x (goal 1.15x); layer forward+backward / frozen nn.Linear "
                  f"forward+dx: {rep['layer_train_vs_frozen_linear']:.2f}x, / trained nn.Linear forward+dx+dW: "
                  f"{rep['layer_train_vs_trained_linear']:.2f}x (goal 1.3x); a per-expert Python loop's forward "
                  f"(each expert's LoRA over all tokens) / the fused layer's: {rep['naive_forward_vs_layer']:.1f}x "
                  "(goal 3x).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    """``proper bench --plan``: the launch plans of the goal cases, with their predicted cost."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="proper bench --plan", description=main.__doc__)
    p.add_argument("--plan", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", choices=("sm90", "sm80"), default="sm90")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--case", choices=[c.name for c in CASES], action="append", help="one case (repeatable)")
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    p.add_argument("--backend", choices=("triton", "cuda"), default="triton",
                   help="whose launches: the Triton backend's (recorded) or the CUDA tensor-core path's (modelled)")
    args = p.parse_args(argv)
    cases = [case(n) for n in args.case] if args.case else list(CASES)
    if args.backend == "cuda":  # the tensor-core path: prefill shapes within its columns
        from .cuda_backend import tensor_core_fits

        cases = [c for c in cases if not c.per_token and tensor_core_fits(c.E, c.r, c.r_u, True)]
    gpu = GPUS[args.target]
    text = (f"# Launch plan of the fused op, predicted for an {gpu['name']} (roofline: "
            f"{gpu['tensor_flops'] / 1e12:.0f} TFLOP/s 16-bit, {gpu['bandwidth'] / 1e12:.2f} TB/s)\n\n"
            "`proper bench --plan" + (f" --target {args.target}" if args.target != "sm90" else "")
            + (f" --dtype {args.dtype}" if args.dtype != "bfloat16" else "")
            + (" --backend cuda" if args.backend == "cuda" else "") + "`. "
            + ("The launches are the ones the Triton backend makes on a GPU of the target (recorded from the real "
               "host code on meta tensors); " if args.backend == "triton" else
               "The launches are the CUDA backend's tensor-core path (prefill cases only), from the model of its "
               "C++ launchers in proper_kernels.cost.record_cuda_call; ")
            + "bytes count each tensor a launch touches once; times are max(bytes / bandwidth, FLOPs / peak), "
            "predictions, not measurements.\n\n"
            + markdown([plan_report(c, args.dtype, args.target, gpu, args.backend) for c in cases]))
    print(text)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(text)
    sys.stdout.flush()
    return 0
