"""The speed goals of the fused op, measured side by side in one run (benchmarks/run_gpu.sh):

- the fused layer's forward (base GEMM + fused op) against a plain nn.Linear (goal <= 1.15x);
- its forward+backward against the plain layer's (goal <= 1.3x; the frozen base's forward +
  dx, and a trained nn.Linear's forward + dx + dW, both reported);
- against a per-expert Python loop (goal >= 3x faster);
- decode: the bandwidth the plan's bytes imply at the measured time (goal >= 70% of HBM; for
  the CUDA backend the floor's bytes), and the naive loop / layer (CUDA decode goal >= 8x).

Timed with the harness's one timer (proper.apps.bench.timing: CUDA events via do_bench on a
GPU, interleaved perf_counter rounds on the CPU).

    python -m benchmarks.goals [--out DIR] [--smoke] [--backend triton|cuda|auto]

Each row also carries the roofline prediction of ``proper bench --plan``. ``--smoke`` runs
tiny shapes on the CPU (the torch backend) so the script itself stays tested without a GPU;
its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

import proper_kernels
from proper.apps.bench.timing import time_interleaved
from proper_kernels import cost
from proper_kernels.plan import build_plan

PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def peak_bandwidth(name: str) -> float:
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), 3.35e12)


def medians_s(timings: dict) -> dict[str, float]:
    """Median seconds of the harness timer's results (proper.apps.bench.timing: the one timer)."""
    return {name: t.median_ms / 1e3 for name, t in timings.items()}


def tensors(c: cost.Case, device, dtype, n_users: int):
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s, scale=0.02: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
    lead = (c.T,) if c.per_token else (c.users, c.T // c.users)
    ids = torch.randint(0, n_users, (c.T,) if c.per_token else (c.users,), generator=g).to(device)
    return dict(
        x=rnd(*lead, c.d_in, scale=1.0), weight=rnd(c.d_out, c.d_in), lora_A=rnd(c.E, c.r, c.d_in),
        lora_B=rnd(c.E, c.d_out, c.r), router_x=rnd(c.E, c.d_in), router_user=rnd(n_users + 1, c.E),
        router_h=rnd(c.E, c.r_u), user_A=rnd(n_users, c.r_u, c.d_in), user_B=rnd(n_users, c.d_out, c.r_u),
        user_ids=ids,
    )


def measure(c: cost.Case, device: torch.device, dtype: torch.dtype, backend: str, rounds: int) -> dict:
    n_users = max(c.users, 1) * 4
    t = tensors(c, device, dtype, n_users)
    x, W = t["x"], t["weight"]
    params = {n: t[n] for n in ("lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")}
    plan = build_plan(t["user_ids"], x.shape[:-1], device, n_users)

    def fused(inp, ps, base=None):
        base = inp @ W.t() if base is None else base
        return proper_kernels.proper_linear(inp, base, scaling=2.0, top_k=c.k, user_ids=t["user_ids"],
                                            user_scaling=1.0, backend=backend, plan=plan, **ps)

    def naive(inp, ps):
        """What users write today: the base, then each expert's LoRA over every token,
        weighted by its gate, then each user's LoRA over the user's tokens."""
        base = inp @ W.t()
        xt, y = inp.reshape(-1, c.d_in), base.reshape(-1, c.d_out).clone()
        uid = plan.user_ids
        logits = (xt.float() @ ps["router_x"].float().t() + ps["router_user"][uid.clamp(min=0)].float())
        gates, idx = proper_kernels.reference.router_topk(logits, c.k)
        dense = torch.zeros_like(logits).scatter(1, idx, gates).to(dtype)
        for e in range(c.E):
            y = y + 2.0 * dense[:, e:e + 1] * ((xt @ ps["lora_A"][e].t()) @ ps["lora_B"][e].t())
        for u in torch.unique(uid).tolist():
            if u >= 0:
                m = uid == u
                y[m] = y[m] + (xt[m] @ ps["user_A"][u].t()) @ ps["user_B"][u].t()
        return y

    grads = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    xg = x.clone().requires_grad_(True)
    dy = torch.randn(*x.shape[:-1], c.d_out, device=device, dtype=dtype)
    linear = torch.nn.Linear(c.d_in, c.d_out, bias=False, device=device, dtype=dtype)

    def linear_train():
        linear(xg).backward(dy)

    def frozen_train():
        (xg @ W.t()).backward(dy)

    def fused_train():
        fused(xg, grads).backward(dy)

    with torch.no_grad():
        base = x @ W.t()
        times = medians_s(time_interleaved(dict(
            linear_forward=lambda: x @ W.t(),
            layer_forward=lambda: fused(x, params),
            op_forward=lambda: fused(x, params, base),
            naive_forward=lambda: naive(x, params),
        ), device, rounds))
    times.update(medians_s(time_interleaved(
        dict(linear_train=linear_train, frozen_train=frozen_train, layer_train=fused_train), device, rounds,
        grads=dict(linear_train=[xg, linear.weight], frozen_train=[xg], layer_train=[xg, *grads.values()]))))
    dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
    rep = cost.plan_report(c, dtype_name, "sm90")
    peak = peak_bandwidth(torch.cuda.get_device_name(device) if device.type == "cuda" else "")
    # The bytes behind the bandwidth share: the Triton plan's for the Triton backend (recorded),
    # the floor's for the others (x, base_out, y, the adapters and bank rows once).
    moved = rep["forward_bytes"] if backend == "triton" else cost.floor_bytes(c, dtype_name)["forward"]
    return dict(
        case=c.name, times_s=times,
        layer_forward_vs_linear=times["layer_forward"] / times["linear_forward"],
        layer_train_vs_frozen_linear=times["layer_train"] / times["frozen_train"],
        layer_train_vs_trained_linear=times["layer_train"] / times["linear_train"],
        naive_vs_layer=times["naive_forward"] / times["layer_forward"],
        op_bandwidth_fraction=moved / times["op_forward"] / peak,
        predicted=dict(layer_forward_vs_linear=rep["layer_forward_vs_linear"],
                       layer_train_vs_frozen_linear=rep["layer_train_vs_frozen_linear"],
                       naive_vs_layer=rep["naive_forward_vs_layer"]),
    )


def markdown(result: dict) -> str:
    lines = [f"# Speed goals on {result['device']} ({result['date']})", "",
             f"`python -m benchmarks.goals`, {result['dtype']}, backend {result['backend']}; versions: "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ". Measured (predicted).", "",
             "| case | layer fwd / nn.Linear fwd (goal 1.15) | layer fwd+bwd / frozen fwd+dx (goal 1.3) | "
             "/ trained nn.Linear fwd+bwd | naive loop / layer fwd (goal 3) | op fwd HBM share (decode goal 0.7) |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        p = r["predicted"]
        lines.append(f"| {r['case']} | {r['layer_forward_vs_linear']:.2f} ({p['layer_forward_vs_linear']:.2f}) | "
                     f"{r['layer_train_vs_frozen_linear']:.2f} ({p['layer_train_vs_frozen_linear']:.2f}) | "
                     f"{r['layer_train_vs_trained_linear']:.2f} | {r['naive_vs_layer']:.1f} ({p['naive_vs_layer']:.1f}) "
                     f"| {r['op_bandwidth_fraction']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.goals", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (the script's own test)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--backend", choices=("triton", "cuda", "auto"), default="triton",
                   help="the backend of the fused layer on the GPU")
    args = p.parse_args(argv)
    if args.smoke:
        device, dtype, backend, rounds = torch.device("cpu"), torch.float32, "torch", 1
        cases = [cost.Case("prefill-smoke", 64, 32, 24, 4, 2, 4, 4, 4, False, True),
                 cost.Case("decode-smoke", 8, 32, 24, 4, 2, 4, 4, 8, True, False)]
        name = "CPU (smoke test)"
    else:
        if not torch.cuda.is_available():
            print("benchmarks.goals: needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 2
        device, dtype, backend, rounds = torch.device("cuda"), torch.bfloat16, args.backend, args.rounds
        cases = [cost.case(n) for n in ("prefill", "decode", "down-proj", "rank4")]
        name = torch.cuda.get_device_name()
    import triton

    result = dict(device=name, date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), dtype=str(dtype).split(".")[1],
                  backend=backend, versions=dict(torch=torch.__version__, triton=triton.__version__,
                                                 cuda=str(torch.version.cuda)),
                  rows=[measure(c, device, dtype, backend, rounds) for c in cases])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"goals-{'smoke' if args.smoke else 'gpu-' + backend}-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
