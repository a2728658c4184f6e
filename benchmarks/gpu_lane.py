"""The Triton checks that need a GPU, and their dry run on the CPU.

    python -m benchmarks.gpu_lane [--goal-cases] [--dry-run] [--rows FILE]

On a patched layer (the Triton backend, every router and the user bank on):

1. host_sync: one training step has no host sync in its forward and backward: it runs under
   ``no_host_sync`` (CUDA: ``torch.cuda.set_sync_debug_mode("error")``, so any sync raises).
   The ids are checked and ``proper.user_context`` entered before (they validate the ids,
   with a sync, once a batch), so the guard covers the model's forward and backward only.
   The step must launch Triton kernels.
2. cuda_graph: the same step captured in a CUDA graph and replayed gives the eager
   step's gradients.
3. spills: no Triton kernel loaded so far spills registers (the driver's count, beside the
   compile gate's): the layer's forward and backward kernels; with ``--goal-cases`` also
   those of every goal case, which compiles a few dozen more.

``--dry-run``: on the CPU, under TRITON_INTERPRET=1, a smaller layer; there the guard refuses
``item``, ``tolist``, ``bool`` and the other host reads of a tensor, and checks 2 and 3 are
recorded as skipped. Each check writes a row ``{name, ok, detail}`` (``--rows``; a skipped
one has ``ok`` None and a ``skipped`` note; a warm-up step that fails is a row ``warmup``
and ends the lane); the last line is ``summary: ...``. Exits 1 on a failed check, 2 without
a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn

import proper
import proper_kernels
from benchmarks.rows import RowSink, summary
from proper.apps.bench.timing import HostSyncError, capture_graph, no_host_sync
from proper_kernels import cost
from proper_kernels._checks import check_id_range


@dataclass(frozen=True)
class Layer:
    """The patched layer of the lane and its batch."""

    d_in: int
    d_out: int
    experts: int
    rank: int  # the experts' and the user bank's
    users: int  # rows of the user bank
    batch: int  # sequences, of users 3, -1, 7, 3, 3, -1, ...
    seq: int
    dtype: torch.dtype


GPU_LAYER = Layer(256, 512, 8, 16, 32, 4, 128, torch.bfloat16)
DRY_LAYER = Layer(64, 96, 4, 4, 8, 2, 24, torch.float32)


def run_goal_cases() -> None:
    """Forward and backward of every goal case on the Triton backend (bf16), to load the kernels."""
    from benchmarks.goals import tensors

    for c in cost.CASES:
        t = tensors(c, torch.device("cuda"), torch.bfloat16, max(c.users, 1) * 4)
        ps = {n: t[n].requires_grad_(True) for n in ("x", "lora_A", "lora_B", "router_x", "router_user",
                                                     "router_h", "user_A", "user_B")}
        base = (ps["x"] @ t["weight"].t()).detach()
        y = proper_kernels.proper_linear(base_out=base, scaling=2.0, top_k=c.k, user_ids=t["user_ids"],
                                         user_scaling=1.0, backend="triton", **ps)
        y.float().square().mean().backward()
    torch.cuda.synchronize()


def triton_modules() -> list:
    """Every proper_kernels.triton_* module: each strategy's file holds its own kernels."""
    import importlib
    import pkgutil

    return [importlib.import_module(f"proper_kernels.{m.name}") for m in pkgutil.iter_modules(proper_kernels.__path__)
            if m.name.startswith("triton_")]


def spills() -> tuple[int, list[str]]:
    """(Triton kernels loaded in this process, one line per kernel that spills registers)."""
    bad, seen = [], 0
    for module in triton_modules():
        for name in dir(module):
            fn = getattr(module, name)
            caches = getattr(fn, "device_caches", None)
            if not caches:
                continue
            for cache in caches.values():
                for kernel in cache[0].values():
                    kernel._init_handles()
                    seen += 1
                    if kernel.n_spills:
                        bad.append(f"{name}: {kernel.n_spills} spilled registers ({kernel.n_regs} registers)")
    return seen, bad


def patched_layer(device="cuda", spec: Layer = GPU_LAYER) -> nn.Module:
    """A linear layer patched with proper on the Triton backend, its B halves non-zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(spec.d_in, spec.d_out, bias=False)).to(device=device, dtype=spec.dtype)
    cfg = proper.ProperConfig(num_experts=spec.experts, top_k=2, rank=spec.rank, user_rank=spec.rank,
                              num_users=spec.users, router=("token", "user", "lora"), backend="triton",
                              target_modules=("0",))
    proper.patch_model(model, cfg)
    for layer in proper.proper_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02)
            layer.user_B.normal_(0, 0.02)
    return model


def lane_inputs(device, spec: Layer = GPU_LAYER) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [batch, seq, d_in], one user id per sequence, -1 among them)."""
    x = torch.randn(spec.batch, spec.seq, spec.d_in, device=device, dtype=spec.dtype)
    users = torch.tensor([(3, -1, 7, 3)[i % 4] for i in range(spec.batch)], device=device)
    return x, users


def step(model, x, users):
    with proper.user_context(model, users):
        y = model(x)
    y.float().square().mean().backward()


@contextlib.contextmanager
def counting_launches() -> Iterator[list]:
    """A list that gets one entry per Triton launch (proper_kernels.launch.launch) inside."""
    from proper_kernels import launch

    names, run = [], launch.launch

    def counted(kernel, *args, **kwargs):
        names.append(getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel)))
        return run(kernel, *args, **kwargs)

    launch.launch = counted
    try:
        yield names
    finally:
        launch.launch = run


def host_sync_problem(model, x, users, num_users: int) -> tuple[Optional[str], str]:
    """(None, detail) when one training step has no host sync in the model's forward and
    backward, else (what synced, detail). The ids are checked and the user context entered
    before the guarded region: only the step is inside it."""
    check_id_range(users, num_users)  # user_context validates the ids once, with a sync, before the step
    with proper.user_context(model, users), counting_launches() as launches:
        try:
            with no_host_sync(x.device):
                y = model(x)
                y.float().square().mean().backward()
        except HostSyncError as e:
            return f"a host sync in the training step: {e}", ""
    detail = f"{len(launches)} Triton launches ({', '.join(sorted(set(launches)))})"
    return (None if launches else "the step launched no Triton kernel"), detail


def cuda_graph_problem(model, x, users) -> Optional[str]:
    """None when the training step captured in a CUDA graph and replayed gives the eager
    step's gradients, else what went wrong."""
    params = [p for p in model.parameters() if p.requires_grad]

    def zero():
        for p in params:
            p.grad = None

    def run():
        model(x).float().square().mean().backward()

    with proper.user_context(model, users):
        zero()
        run()
        eager = [p.grad.clone() for p in params]
        graph, _ = capture_graph(lambda: (zero(), run()), x.device)  # the step once, then replayed
        graph.replay()
        torch.cuda.synchronize()
    for p, g in zip(params, eager):
        if not torch.allclose(p.grad.float(), g.float(), rtol=1e-2, atol=1e-3):
            return "the CUDA-graph replay gave other gradients than the eager step"
    return None


class Rows:
    """The lane's checks as rows: each printed, written to the sink, kept."""

    def __init__(self, sink: RowSink):
        self.sink, self.rows = sink, []

    def add(self, name: str, problem: Optional[str], detail: str = "", skipped: Optional[str] = None) -> None:
        row = dict(name=name, ok=None if skipped else problem is None, detail=problem or detail)
        if skipped:
            row["skipped"] = skipped
        print(f"{name}: " + (f"skipped ({skipped})" if skipped else "ok" if problem is None else "FAIL")
              + (f": {row['detail']}" if row["detail"] else ""), flush=True)
        self.rows.append(self.sink.write(row))

    def failed(self) -> list[str]:
        return [r["name"] for r in self.rows if r["ok"] is False]

    def summary(self) -> str:
        state = {None: "skipped", True: "ok", False: "FAILED"}
        return ", ".join(f"{r['name']} {state[r['ok']]}" for r in self.rows)


def _guarded(fn) -> tuple[Optional[str], str]:
    """fn() as (problem, detail); an exception is the problem."""
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001  (a check that raises has failed; the rest still run)
        return f"{type(e).__name__}: {e}"[:500], ""
    return out if isinstance(out, tuple) else (out, "")


def run_lane(rows: Rows, dry_run: bool, goal_cases: bool) -> None:
    """The lane's checks, in order, each a row (see the module's docstring)."""
    device = torch.device("cpu" if dry_run else "cuda")
    spec = DRY_LAYER if dry_run else GPU_LAYER
    no_gpu = "dry run: needs a CUDA GPU"

    def goals():
        run_goal_cases()
        return None, f"{len(cost.CASES)} goal cases, forward and backward"

    if goal_cases and dry_run:
        rows.add("goal_cases", None, skipped=no_gpu)
    elif goal_cases:
        rows.add("goal_cases", *_guarded(goals))
    model = patched_layer(device, spec)
    x, users = lane_inputs(device, spec)
    problem, _ = _guarded(lambda: step(model, x, users))  # compile and warm up outside the checks
    if problem:
        rows.add("warmup", problem)
        return
    for p in model.parameters():
        p.grad = None
    rows.add("host_sync", *_guarded(lambda: host_sync_problem(model, x, users, spec.users)))
    if dry_run:
        rows.add("cuda_graph", None, skipped=no_gpu)
        rows.add("spills", None, skipped=no_gpu + "; the compile gate counts spills without one")
        return
    rows.add("cuda_graph", *_guarded(lambda: cuda_graph_problem(model, x, users)))

    def spill_check():
        seen, bad = spills()
        if not seen:
            return "no Triton kernel was loaded", ""
        return ("; ".join(bad) or None), f"{seen} loaded Triton kernels, {len(bad)} spilling"

    rows.add("spills", *_guarded(spill_check))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_lane", description=__doc__.split("\n\n")[0])
    p.add_argument("--goal-cases", action="store_true",
                   help="also load every goal case's kernels, so that the spill check covers them (slow: compiles)")
    p.add_argument("--dry-run", action="store_true",
                   help="on the CPU under TRITON_INTERPRET=1: the host-sync check only, the others skipped")
    p.add_argument("--rows", metavar="FILE", help="append one JSON row per check to FILE")
    args = p.parse_args(argv)
    from proper_kernels import launch

    why = None
    if args.dry_run and not launch.interpreting():
        why = "--dry-run needs TRITON_INTERPRET=1 in the environment (set before Python starts)"
    elif not args.dry_run and (launch.interpreting() or not torch.cuda.is_available()):
        why = ("TRITON_INTERPRET=1 is set" if launch.interpreting() else "no CUDA GPU") + \
            ": the checks need a CUDA GPU (--dry-run runs on the CPU)"
    if why:
        print("gpu_lane:", why, file=sys.stderr, flush=True)
        summary("not run: " + why)
        return 2
    rows = Rows(RowSink(args.rows, "lane"))
    run_lane(rows, args.dry_run, args.goal_cases)
    bad = rows.failed()
    print("gpu_lane:", "ok" if not bad else f"{len(bad)} failed: {', '.join(bad)}")
    summary(("dry run: " if args.dry_run else "") + rows.summary())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
