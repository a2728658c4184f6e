"""The speed goals of the fused op, measured side by side in one run (a phase of the GPU lease):

- the fused layer's forward (base GEMM + fused op) against a plain nn.Linear (goal <= 1.15x);
- its forward+backward against the plain layer's (goal <= 1.3x; the frozen base's forward +
  dx, and a trained nn.Linear's forward + dx + dW, both reported);
- against a per-expert Python loop (goal >= 3x faster);
- decode: the bandwidth the plan's bytes imply at the measured time, as a share of the copy
  bandwidth measured in the same run (goal >= 70%; for the CUDA backend the floor's bytes),
  eagerly and as a CUDA-graph replay, and the naive loop / layer (CUDA decode goal >= 8x).

    python -m benchmarks.goals [--backend torch|triton|cuda|auto] [--cases NAME ...] [--out DIR]
                               [--rows FILE] [--rounds N] [--budget-ms MS] [--no-profile] [--smoke]

Timed with the harness's one timer (proper.apps.bench.timing: CUDA events via do_bench, about
``--budget-ms`` per variant, on a GPU; interleaved perf_counter rounds on the CPU). The user
ids are validated and the batch plan built once, outside the timed calls; before timing,
every timed closure of the linear, layer and op variants runs once under ``no_host_sync`` and
the row records which are free of host syncs (a sync fails the phase). The naive loop syncs
by design and is not checked. For the headline case (``prefill``), ``torch.profiler`` gives
the time of every kernel of one forward+backward of the layer (``--no-profile``: off).

Each row is written the moment it is measured: appended to ``--rows`` (JSON lines, see
benchmarks/rows.py) and the ``--out`` JSON and markdown rewritten, so a run killed at a time
limit keeps every row before the kill. The last line of output is ``summary: ...``. Exit
status: 0, 1 when a case failed or a variant synced, 2 for a usage error. Each row also
carries the roofline prediction of ``proper bench --plan``.

``--smoke`` runs tiny shapes on the CPU (the torch backend, or ``--backend triton`` under
TRITON_INTERPRET=1) so the script itself stays tested without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

import proper_kernels
from benchmarks.rows import RowSink, summary
from proper.apps.bench.timing import (HostSyncError, Timing, capture_graph, measure_peaks, no_host_sync,
                                      time_interleaved, timer_description)
from proper_kernels import cost
from proper_kernels._checks import check_id_range
from proper_kernels.plan import build_plan

# The data sheets' HBM bandwidth (bytes/s): a second, labeled column only; the goal's
# denominator is the copy bandwidth measured in the same run.
NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
DEFAULT_CASES = ("prefill", "decode", "down-proj", "rank4")
SMOKE_CASES = ("prefill", "decode")
HEADLINE = "prefill"  # the case whose kernels are profiled
PROFILE_ROWS = 40  # at most this many kernel names, the longest first
FORWARD = ("linear_forward", "layer_forward", "op_forward")  # captured as CUDA graphs for decode
NAIVE_NOTE = "not checked: the per-expert Python loop syncs by design (torch.unique, boolean masks)"
CPU_GRAPH_NOTE = "skipped: CUDA graphs need a CUDA device"


@dataclass(frozen=True)
class Run:
    """What every case of one run shares: where and how it is timed, and the measured copy
    bandwidth (GB/s) that bandwidth shares are taken of."""

    device: torch.device
    dtype: torch.dtype
    backend: str
    rounds: int
    budget_ms: float
    copy_gbps: float
    nominal_gbps: Optional[float] = None


@dataclass
class Variants:
    """The timed closures of one case: ``forward`` (no grad), ``train`` (forward+backward;
    ``grads`` are the tensors whose .grad is reset before each run)."""

    forward: dict
    train: dict
    grads: dict


def nominal_bandwidth(name: str) -> Optional[float]:
    """The data sheet's bandwidth (bytes/s) of a GPU named `name`, None when not in the table."""
    return next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in name), None)


def smoke_case(c: cost.Case) -> cost.Case:
    """`c` shrunk to a few tokens and features for the CPU (same kind: decode or prefill)."""
    T = 8 if c.per_token else 64
    return replace(c, name=c.name + "-smoke", T=T, d_in=48 if c.d_in > c.d_out else 32, d_out=24,
                   E=min(c.E, 4), k=min(c.k, 2), r=min(c.r, 4), r_u=min(c.r_u, 4),
                   users=min(c.users, T if c.per_token else 4))


def select_cases(names, smoke: bool) -> list[cost.Case]:
    """The goal cases named (proper_kernels.cost.CASES), shrunk with --smoke."""
    known = [c.name for c in cost.CASES]
    names = list(names or (SMOKE_CASES if smoke else DEFAULT_CASES))
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"--cases: unknown case(s) {bad}; known: {known}")
    return [smoke_case(cost.case(n)) if smoke else cost.case(n) for n in names]


def is_decode(c: cost.Case) -> bool:
    """Decode cases (one id per token: one new token per sequence) are also timed as CUDA graphs."""
    return c.per_token


def tensors(c: cost.Case, device, dtype, n_users: int):
    """Random inputs of case `c` (seed 0) with a bank of `n_users` users: the layer's x and
    weight, the adapters, the routers and the user ids (per token or per sequence)."""
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


def build(c: cost.Case, run: Run) -> Variants:
    """The closures of case `c`. The ids are validated and the plan built here, once (as
    proper.user_context does per batch), so no timed call checks the ids with a host sync."""
    device, dtype = run.device, run.dtype
    n_users = max(c.users, 1) * 4
    t = tensors(c, device, dtype, n_users)
    x, W = t["x"], t["weight"]
    params = {n: t[n] for n in ("lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")}
    check_id_range(t["user_ids"], n_users)
    plan = build_plan(t["user_ids"], x.shape[:-1], device, n_users)

    def fused(inp, ps, base=None):
        base = inp @ W.t() if base is None else base
        return proper_kernels.proper_linear(inp, base, scaling=2.0, top_k=c.k, user_ids=t["user_ids"],
                                            user_scaling=1.0, backend=run.backend, plan=plan,
                                            check_user_ids=False, **ps)

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
    base = x @ W.t()
    return Variants(
        forward=dict(linear_forward=lambda: x @ W.t(), layer_forward=lambda: fused(x, params),
                     op_forward=lambda: fused(x, params, base), naive_forward=lambda: naive(x, params)),
        train=dict(linear_train=lambda: linear(xg).backward(dy), frozen_train=lambda: (xg @ W.t()).backward(dy),
                   layer_train=lambda: fused(xg, grads).backward(dy)),
        grads=dict(linear_train=[xg, linear.weight], frozen_train=[xg], layer_train=[xg, *grads.values()]),
    )


def _reset(params) -> None:
    for p in params:
        p.grad = None


def sync_check(fns: dict, grads: dict, device: torch.device) -> dict[str, Optional[str]]:
    """Each function run once (warm-up and JIT), then once under no_host_sync: name -> None
    when free of host syncs, else the HostSyncError's message. The naive loop is skipped."""
    out = {}
    for name, fn in fns.items():
        if name.startswith("naive"):
            continue
        _reset(grads.get(name, ()))
        fn()
        _reset(grads.get(name, ()))
        try:
            with no_host_sync(device):
                fn()
            out[name] = None
        except HostSyncError as e:
            out[name] = str(e).splitlines()[0][:300]
        _reset(grads.get(name, ()))
    return out


def graph_timings(v: Variants, run: Run) -> tuple[dict, dict]:
    """The forward variants as CUDA-graph replays: ({name_graph: Timing}, {status, note}),
    timed by the same timer; on the CPU, skipped (no timings)."""
    if run.device.type != "cuda":
        return {}, dict(status="skipped", note=CPU_GRAPH_NOTE)
    try:
        with torch.no_grad():
            graphs = {f"{n}_graph": capture_graph(v.forward[n], run.device) for n in FORWARD}
            timings = time_interleaved({n: g.replay for n, (g, _) in graphs.items()}, run.device, run.rounds,
                                       budget_ms=run.budget_ms)
    except Exception as e:  # a capture failure is a result of the case, reported as a failure
        return {}, dict(status="failed", note=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    return timings, dict(status="measured", note="graph.replay() of the forward captured over static inputs")


def _timing(t: Optional[Timing]) -> Optional[dict]:
    return None if t is None else dict(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps)


def measure(c: cost.Case, run: Run) -> tuple[dict, Variants]:
    """The goal row of case `c` (and its closures, for the profile)."""
    v = build(c, run)
    with torch.no_grad():
        syncs = sync_check(v.forward, {}, run.device)
        timings = time_interleaved(v.forward, run.device, run.rounds, budget_ms=run.budget_ms)
    syncs.update(sync_check(v.train, v.grads, run.device))
    timings.update(time_interleaved(v.train, run.device, run.rounds, budget_ms=run.budget_ms, grads=v.grads))
    graph = None
    if is_decode(c):
        g_timings, graph = graph_timings(v, run)
        timings.update({f"{n}_graph": g_timings.get(f"{n}_graph") for n in FORWARD})
    times = {n: (t.median_ms / 1e3 if t is not None else None) for n, t in timings.items()}

    dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(run.dtype, "float32")
    rep = cost.plan_report(c, dtype_name, "sm90")
    # The bytes behind the bandwidth share: the Triton plan's for the Triton backend (recorded),
    # the floor's for the others (x, base_out, y, the adapters and bank rows once).
    moved = rep["forward_bytes"] if run.backend == "triton" else cost.floor_bytes(c, dtype_name)["forward"]

    def gbps(name):
        return moved / times[name] / 1e9 if times.get(name) else None

    def share(gb, of):
        return gb / of if gb is not None and of else None

    op_gbps, graph_gbps = gbps("op_forward"), gbps("op_forward_graph")
    return dict(
        record="goal", case=c.name, backend=run.backend, device=run.device.type, dtype=dtype_name,
        shape=dict(T=c.T, d_in=c.d_in, d_out=c.d_out, E=c.E, k=c.k, r=c.r, r_u=c.r_u, users=c.users,
                   per_token=c.per_token),
        times_s=times, timings_ms={n: _timing(t) for n, t in timings.items()},
        host_sync_free={**{n: err is None for n, err in syncs.items()}, "naive_forward": None},
        host_sync_errors={n: err for n, err in syncs.items() if err is not None},
        notes=dict(naive_forward=NAIVE_NOTE),
        layer_forward_vs_linear=times["layer_forward"] / times["linear_forward"],
        layer_train_vs_frozen_linear=times["layer_train"] / times["frozen_train"],
        layer_train_vs_trained_linear=times["layer_train"] / times["linear_train"],
        naive_vs_layer=times["naive_forward"] / times["layer_forward"],
        op_bytes=moved, op_bytes_model="Triton launch plan" if run.backend == "triton" else "floor",
        op_gbps=op_gbps, copy_gbps=run.copy_gbps,
        op_bandwidth_fraction=share(op_gbps, run.copy_gbps),
        nominal_gbps=run.nominal_gbps, op_bandwidth_fraction_nominal=share(op_gbps, run.nominal_gbps),
        graph=graph,
        op_bandwidth_fraction_graph=share(graph_gbps, run.copy_gbps),
        layer_forward_vs_linear_graph=(times["layer_forward_graph"] / times["linear_forward_graph"]
                                       if graph and graph["status"] == "measured" else None),
        predicted=dict(layer_forward_vs_linear=rep["layer_forward_vs_linear"],
                       layer_train_vs_frozen_linear=rep["layer_train_vs_frozen_linear"],
                       naive_vs_layer=rep["naive_forward_vs_layer"]),
    ), v


def row_failures(row: dict) -> list[str]:
    """What in a goal row fails the phase: a variant with a host sync, a failed graph capture."""
    out = [f"{row['case']}: {n} syncs with the host ({e})" for n, e in row["host_sync_errors"].items()]
    if row["graph"] and row["graph"]["status"] == "failed":
        out.append(f"{row['case']}: CUDA graph capture failed ({row['graph']['note']})")
    return out


def profile(fn: Callable, case: str, run: Run) -> list[dict]:
    """Per kernel name, the count and total time of one call of fn under torch.profiler:
    device (CUDA) activity on a GPU, self CPU time of each op on the CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    cuda = run.device.type == "cuda"
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(run.device)
    totals: dict[str, list] = {}
    for e in prof.events():
        if cuda:
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.time_range.elapsed_us()
        else:
            us = e.self_cpu_time_total
        slot = totals.setdefault(e.name, [0, 0.0])
        slot[0] += 1
        slot[1] += us
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:PROFILE_ROWS]
    return [dict(record="profile", case=case, backend=run.backend, activity="cuda" if cuda else "cpu",
                 call="layer_train: one forward+backward of the fused layer", name=name, count=n,
                 total_us=us) for name, (n, us) in ranked]


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    copy = _f(result["peaks"].get("copy_gbps"), ".0f")
    lines = [f"# Speed goals on {result['device']} ({result['date']})", "",
             f"`python -m benchmarks.goals`, {result['dtype']}, backend {result['backend']}; versions: "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
             + f". Measured (predicted). Copy bandwidth measured in this run: {copy} GB/s;"
             " the bandwidth shares are of it (the data sheet's in the nominal column)."
             + ("" if result.get("finished") else " **Unfinished run: the rows so far.**"), "",
             "| case | layer fwd / nn.Linear fwd (goal 1.15) | layer fwd+bwd / frozen fwd+dx (goal 1.3) | "
             "/ trained nn.Linear fwd+bwd | naive loop / layer fwd (goal 3) | op fwd share of copy BW "
             "(decode goal 0.7) | same, CUDA graph | same, of nominal HBM | host-sync free |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        p = r["predicted"]
        free = [n for n, ok in r["host_sync_free"].items() if ok is False]
        graph = _f(r["op_bandwidth_fraction_graph"], ".2f") if not r["graph"] or r["graph"]["status"] == "measured" \
            else r["graph"]["status"]
        cells = [r["case"], f"{r['layer_forward_vs_linear']:.2f} ({p['layer_forward_vs_linear']:.2f})",
                 f"{r['layer_train_vs_frozen_linear']:.2f} ({p['layer_train_vs_frozen_linear']:.2f})",
                 f"{r['layer_train_vs_trained_linear']:.2f}", f"{r['naive_vs_layer']:.1f} ({p['naive_vs_layer']:.1f})",
                 _f(r["op_bandwidth_fraction"], ".2f"), graph, _f(r["op_bandwidth_fraction_nominal"], ".2f"),
                 "yes" if not free else "NO: " + ", ".join(free)]
        lines.append("| " + " | ".join(cells) + " |")
    if result["profile"]:
        lines += ["", f"Kernels of one forward+backward of the layer at {result['profile'][0]['case']} "
                  f"(torch.profiler, {result['profile'][0]['activity']} time):", "",
                  "| kernel | count | total us |", "|---|---|---|"]
        lines += [f"| `{r['name'][:80]}` | {r['count']} | {r['total_us']:.1f} |" for r in result["profile"][:15]]
    if result["failures"]:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in result["failures"]]
    return "\n".join(lines) + "\n"


def summary_text(result: dict) -> str:
    """The headline ratios of every case, then the failures."""
    parts = []
    for r in result["rows"]:
        s = (f"{r['case']} fwd {r['layer_forward_vs_linear']:.2f} train {r['layer_train_vs_frozen_linear']:.2f} "
             f"naive {r['naive_vs_layer']:.1f}x bw {_f(r['op_bandwidth_fraction'], '.2f')}")
        if r["graph"] and r["graph"]["status"] == "measured":
            s += f" graph-bw {_f(r['op_bandwidth_fraction_graph'], '.2f')}"
        parts.append(s)
    head = f"goals {result['backend']} on {result['device']}: " + ("; ".join(parts) or "no case measured")
    fails = result["failures"]
    return head + (f"; FAILED ({len(fails)}): " + "; ".join(fails) if fails else "; no failures")


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.goals", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="folder of goals-smoke[-triton]-DATE / goals-gpu-BACKEND-DATE .json and .md")
    p.add_argument("--rows", type=Path, default=None, help="append each row to this JSON-lines file as measured")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (the script's own test)")
    p.add_argument("--backend", choices=("torch", "triton", "cuda", "auto"), default=None,
                   help="the fused layer's backend (default: triton on a GPU, torch with --smoke)")
    p.add_argument("--cases", nargs="+", metavar="NAME", default=None,
                   help=f"goal cases of proper_kernels.cost (default: {' '.join(DEFAULT_CASES)}; "
                        f"--smoke: {' '.join(SMOKE_CASES)})")
    p.add_argument("--rounds", type=int, default=None,
                   help="CPU: interleaved rounds (default 20, --smoke 1); CUDA: the fewest runs per variant")
    p.add_argument("--budget-ms", type=float, default=100.0, help="CUDA: about this long timing each variant")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler kernel rows")
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.budget_ms <= 0:
        p.error(f"--budget-ms must be positive, got {args.budget_ms}")
    return args


def setup(args) -> tuple[torch.device, torch.dtype, str, str]:
    """(device, dtype, backend, device name), or ValueError naming the argument at fault."""
    from proper_kernels import launch
    from proper_kernels.dispatch import select_backend

    if args.smoke:
        device, dtype, backend = torch.device("cpu"), torch.float32, args.backend or "torch"
        if backend == "cuda":
            raise ValueError("--backend cuda needs a GPU; --smoke runs on the CPU (torch, or triton under "
                             "TRITON_INTERPRET=1)")
        if backend == "triton" and not launch.interpreting():
            raise ValueError("--backend triton with --smoke needs TRITON_INTERPRET=1 (the Triton interpreter)")
        name = "CPU (smoke test)"
    else:
        if not torch.cuda.is_available():
            raise ValueError("needs a CUDA GPU (or --smoke)")
        device, dtype, backend = torch.device("cuda"), torch.bfloat16, args.backend or "triton"
        name = torch.cuda.get_device_name(device)
    try:
        select_backend(backend, device, dtype)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--backend {backend}: {e}") from e
    return device, dtype, backend, name


def main(argv=None) -> int:
    args = parse(argv)
    try:
        device, dtype, backend, name = setup(args)
        cases = select_cases(args.cases, args.smoke)
    except ValueError as e:
        print(f"benchmarks.goals: {e}", file=sys.stderr)
        summary(f"goals not run: {e}")
        return 2
    import triton

    rounds = args.rounds or (1 if args.smoke else 20)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    sink = RowSink(args.rows, phase=f"goals-{backend}")
    peaks = measure_peaks(device, dtype, quick=args.smoke)
    nominal = nominal_bandwidth(name) if device.type == "cuda" else None
    run = Run(device, dtype, backend, rounds, args.budget_ms, peaks["copy_gbps"],
              nominal / 1e9 if nominal else None)
    result = dict(device=name, date=date, dtype=str(dtype).split(".")[1], backend=backend,
                  versions=dict(torch=torch.__version__, triton=triton.__version__, cuda=str(torch.version.cuda)),
                  command="python -m benchmarks.goals " + " ".join(sys.argv[1:] if argv is None else argv),
                  settings=dict(smoke=args.smoke, cases=[c.name for c in cases], rounds=rounds,
                                budget_ms=args.budget_ms if device.type == "cuda" else None,
                                timer=timer_description(device), profile=not args.no_profile),
                  peaks=sink.write(dict(record="peaks", device=name, backend=backend, **peaks)),
                  nominal_gbps=run.nominal_gbps, rows=[], profile=[], errors=[], failures=[], finished=False)
    args.out.mkdir(parents=True, exist_ok=True)
    kind = ("smoke" + ("" if backend == "torch" else f"-{backend}")) if args.smoke else f"gpu-{backend}"
    stem = args.out / f"goals-{kind}-{date}"

    def save():  # each file replaced whole, so a kill mid-write leaves the previous version
        for suffix, text in ((".json", json.dumps(result, indent=1, default=str)), (".md", markdown(result))):
            tmp = stem.with_suffix(suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(stem.with_suffix(suffix))

    save()
    for c in cases:
        try:
            row, variants = measure(c, run)
        except Exception as e:  # one case's error is its row; the other cases still run
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            result["errors"].append(sink.write(dict(record="error", case=c.name, backend=backend, error=msg)))
            result["failures"].append(f"{c.name}: {msg}")
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        result["rows"].append(sink.write(row))
        result["failures"] += row_failures(row)
        save()
        if not args.no_profile and c.name.split("-smoke")[0] == HEADLINE:
            try:
                _reset(variants.grads["layer_train"])
                result["profile"] += [sink.write(r) for r in profile(variants.train["layer_train"], c.name, run)]
            except Exception as e:
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                result["errors"].append(sink.write(dict(record="error", case=c.name, backend=backend,
                                                        error="profile: " + msg)))
                result["failures"].append(f"{c.name} profile: {msg}")
            save()
        del variants
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["finished"] = True
    save()
    print(markdown(result))
    summary(summary_text(result))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
