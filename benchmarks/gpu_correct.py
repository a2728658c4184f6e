"""The lease's correctness phase: the fused op against the float64 reference on the GPU, a
curated list of cases, forward and every gradient, one backend at a time.

    python -m benchmarks.gpu_correct --backend triton|cuda [--workers N] [--rows FILE]
                                     [--case-timeout S] [--dry-run] [--only NAME ...] [--list]

The cases (``CASES``): the headline shape at T=2048 (in = out = 4096, E=8, k=2, r=16,
r_u=16, 8 users) in bf16, fp16 and fp32, and in bf16 without autograd (the in-place
kernels); a decode shape (64 tokens of 64 users); odd shapes (dims off 16, T=1, E=1, k=E,
r_u=0, only users without a row); ids per sequence; and the grouped strategy, narrow and
wide. Each case runs the backend and the reference on the same (cast) inputs and records the
largest error of y, the logits, the gates and every gradient relative to the reference's
largest magnitude; the top-k indices must agree wherever the reference's gate is not ~0.
Every fresh allocation is NaN first (torch's fill_uninitialized_memory), so an element a
kernel leaves unwritten fails.

The cases run in ``--workers`` processes (Triton compiles on the CPU, so the compiles of
different cases overlap). A case over ``--case-timeout`` seconds has its worker killed and is
recorded as a timeout, and a worker whose CUDA context is broken (an illegal address) is
replaced, so one bad case never hides the others. One row per case goes to ``--rows`` the
moment it ends.

``--dry-run`` runs the same cases shrunk to a few dozen tokens and features on the CPU: the
Triton backend under the interpreter (TRITON_INTERPRET=1), the CUDA backend on the SIMT
emulator of the test suite. ``--list`` prints the cases and, for Triton, the number of
distinct kernel specializations the GPU run compiles (recorded on meta tensors).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import queue
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}  # relative; gradients get 2x
TRAINED = ("x", "base_out", "lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")
ALL_ROUTERS = ("token", "user", "lora")


@dataclass(frozen=True)
class Case:
    """One call of the fused op: sizes, dtype, and how it is called."""

    name: str
    T: int
    d_in: int
    d_out: int
    E: int
    k: int
    r: int
    r_u: int
    users: int  # rows of the user bank; the batch mixes them
    dtype: str = "bfloat16"
    train: bool = True  # forward + every gradient; else forward without autograd, in place
    ids: str = "mixed"  # "mixed" (per token, some -1), "distinct" (one user a token), "cold" (all -1)
    seq_len: int = 0  # > 0: one id per sequence of seq_len tokens
    routers: tuple = ALL_ROUTERS
    strategy: Optional[str] = None  # Triton: "dense" | "grouped" (None: the op's choice)

    def tiny(self) -> "Case":
        """The same case at CPU size (the dry run)."""
        T = min(self.T, 40 if not self.seq_len else 2 * min(self.seq_len, 8))
        return replace(self, T=T, d_in=min(self.d_in, 40 + self.d_in % 8), d_out=min(self.d_out, 36 + self.d_out % 8),
                       users=min(self.users, 6) if self.ids != "distinct" else T, E=min(self.E, 16),
                       k=min(self.k, min(self.E, 16)), seq_len=min(self.seq_len, 8))


HEAD = dict(T=2048, d_in=4096, d_out=4096, E=8, k=2, r=16, r_u=16, users=8)
CASES = (
    Case("headline-bf16", **HEAD),
    Case("headline-fp16", **HEAD, dtype="float16"),
    Case("headline-fp32", **HEAD, dtype="float32"),
    Case("headline-bf16-inference", **HEAD, train=False),
    Case("decode-64-users-bf16", 64, 4096, 4096, 8, 2, 16, 16, 64, train=False, ids="distinct"),
    Case("decode-64-users-bf16-train", 64, 4096, 4096, 8, 2, 16, 16, 64, ids="distinct"),
    Case("odd-dims-bf16", 37, 72, 45, 6, 2, 4, 3, 5),
    Case("odd-dims-fp16", 300, 200, 150, 6, 2, 4, 3, 5, dtype="float16"),
    Case("T1-bf16", 1, 136, 100, 8, 2, 16, 16, 4),
    Case("E1-bf16", 300, 256, 192, 1, 1, 16, 8, 6),
    Case("k-equals-E-bf16", 300, 256, 192, 4, 4, 16, 8, 6),
    Case("ru0-bf16", 300, 256, 192, 8, 2, 16, 0, 6, routers=("token", "user")),
    Case("cold-users-bf16", 300, 256, 192, 8, 2, 16, 16, 6, ids="cold"),
    Case("per-sequence-bf16", 1024, 512, 384, 8, 2, 16, 16, 16, seq_len=128),
    Case("grouped-E16-bf16", 1024, 1024, 1024, 16, 2, 16, 16, 8, strategy="grouped"),
    Case("grouped-wide-E64-k8-bf16", 1024, 1024, 1024, 64, 8, 16, 16, 8),
    Case("grouped-E16-fp16", 1024, 1024, 1024, 16, 2, 16, 16, 8, dtype="float16", strategy="grouped"),
)


def make_inputs(c: Case, device, seed: int = 0) -> dict:
    """Random inputs on `device` in float64 (cast per backend later), scaled so that every
    intermediate is O(1): weights by 1/sqrt(fan-in)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, fan_in=1):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float64) / math.sqrt(fan_in)

    lead = (c.T // c.seq_len, c.seq_len) if c.seq_len else (c.T,)
    n = lead[0]
    if c.ids == "distinct":
        ids = torch.randperm(c.users, generator=g, device=device)[:n] if n <= c.users else \
            torch.randint(0, c.users, (n,), generator=g, device=device)
    elif c.ids == "cold":
        ids = torch.full((n,), -1, device=device, dtype=torch.long)
    else:
        ids = torch.randint(-1, c.users, (n,), generator=g, device=device)
        ids[0] = -1
    bank = c.r_u > 0
    return dict(
        x=rnd(*lead, c.d_in), base_out=rnd(*lead, c.d_out),
        lora_A=rnd(c.E, c.r, c.d_in, fan_in=c.d_in), lora_B=rnd(c.E, c.d_out, c.r, fan_in=c.r),
        scaling=1.7, top_k=c.k, temperature=0.8,
        router_x=rnd(c.E, c.d_in, fan_in=c.d_in) if "token" in c.routers else None,
        router_user=rnd(c.users + 1, c.E) if "user" in c.routers else None,
        router_h=rnd(c.E, c.r_u, fan_in=c.r_u) if ("lora" in c.routers and bank) else None,
        user_A=rnd(c.users, c.r_u, c.d_in, fan_in=c.d_in) if bank else None,
        user_B=rnd(c.users, c.d_out, c.r_u, fan_in=c.r_u) if bank else None,
        user_scaling=0.9 if bank else 0.0, user_ids=ids.long(),
    )


def backend_fn(backend: str, c: Case):
    """The backend's proper_linear, called as the dispatcher calls it."""
    from proper_kernels import cuda_backend, reference, triton_linear

    if backend == "torch":  # the oracle itself (the checks' own test)
        return reference.proper_linear
    if backend == "cuda":
        return cuda_backend.proper_linear
    return lambda **kw: triton_linear.proper_linear(**kw, strategy=c.strategy)


def run_case(c: Case, backend: str, device) -> dict:
    """Errors of one case against the float64 reference, and whether they pass."""
    import torch

    from benchmarks.gpu_check import cast, rel_error
    from proper_kernels import reference

    dtype = getattr(torch, c.dtype)
    hi = make_inputs(c, device)
    low, ref_in = cast(hi, dtype)
    names = [n for n in TRAINED if low[n] is not None]
    fn = backend_fn(backend, c)
    t0 = time.perf_counter()
    if c.train:
        ins = {n: low[n].clone().requires_grad_(True) for n in names}
        ins64 = {n: ref_in[n].clone().requires_grad_(True) for n in names}
        y, routing = fn(**dict(low, **ins))
        y64, r64 = reference.proper_linear(**dict(ref_in, **ins64))
        g = torch.Generator(device=device).manual_seed(1)
        gy, gl, gg = (torch.randn(t.shape, generator=g, device=device, dtype=torch.float64)
                      for t in (y64, r64.logits, r64.gates))
        ((y64 * gy).sum() + (r64.logits * gl).sum() + (r64.gates * gg).sum()).backward()
        ((y.double() * gy).sum() + (routing.logits.double() * gl).sum() + (routing.gates.double() * gg).sum()).backward()
    else:
        with torch.no_grad():
            y, routing = fn(**dict(low, base_out=low["base_out"].clone()), inplace=True)
            y64, r64 = reference.proper_linear(**ref_in)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tol = TOL[c.dtype]
    weighty = r64.gates > 1e-6
    errors = {"y": rel_error(y, y64), "logits": rel_error(routing.logits, r64.logits),
              "gates": rel_error(routing.gates, r64.gates)}
    if c.train:
        errors.update({f"d{n}": rel_error(ins[n].grad, ins64[n].grad) if ins[n].grad is not None else float("inf")
                       for n in names})
    flips = int((routing.indices != r64.indices)[weighty].sum())
    limit = {n: (2 * tol if n.startswith("d") else tol) for n in errors}
    bad = [n for n, e in errors.items() if not e <= limit[n]]  # NaN fails too
    ok = not bad and flips == 0 and y.dtype == dtype and tuple(y.shape) == tuple(y64.shape)
    worst = max(errors, key=lambda n: errors[n] / limit[n] if math.isfinite(errors[n]) else math.inf)
    return dict(state="ok" if ok else "fail", worst=worst, worst_error=errors[worst], tolerance=tol,
                errors=errors, index_mismatches=flips, failing=bad, seconds=round(seconds, 3))


# -- workers -------------------------------------------------------------------------------

def _setup_worker(backend: str, dry_run: bool):
    """The device, with NaN-filled fresh allocations; on the CPU the CUDA backend's ops are
    the SIMT emulator's."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    if not dry_run:
        return torch.device("cuda")
    if backend == "cuda":
        sys.path.insert(0, str(ROOT / "tests"))
        from _helpers import emulator

        from proper_kernels import cuda_backend

        cuda_backend._ops = emulator.load()
    return torch.device("cpu")


def _broken_context(e: BaseException) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("illegal memory access", "illegal address", "device-side assert",
                                   "unspecified launch failure", "cuda error: an illegal"))


def _worker(backend: str, dry_run: bool, inbox, done) -> None:
    """Run the cases sent to `inbox` (None: stop); report each on `done`."""
    import warnings

    warnings.filterwarnings("ignore")
    try:
        device = _setup_worker(backend, dry_run)
    except Exception as e:
        done.put((os.getpid(), None, dict(state="fail", error=f"worker setup failed: {type(e).__name__}: {e}")))
        return
    done.put((os.getpid(), None, None))  # ready
    while (item := inbox.get()) is not None:
        i, case = item
        try:
            result = run_case(case, backend, device)
        except Exception as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            done.put((os.getpid(), i, dict(state="fail", error=f"{type(e).__name__}: {first}")))
            if _broken_context(e):
                return  # the parent starts a fresh worker for the rest
            continue
        done.put((os.getpid(), i, result))


@dataclass
class _Slot:
    """A worker process, and the case it runs (None: idle) since when."""

    proc: object
    inbox: object
    case: Optional[int] = None
    since: float = 0.0


def run_all(cases: list[Case], backend: str, opts) -> list[dict]:
    """Every case in `opts.workers` processes, one case at a time each; one row per case to
    the sink as it ends. A case past its timeout, or whose worker dies, is recorded and its
    worker replaced."""
    from benchmarks.rows import RowSink

    sink = RowSink(opts.rows, phase=f"correct-{backend}")
    ctx = mp.get_context("spawn")
    done = ctx.Queue()
    pending = list(range(len(cases)))
    finished: dict[int, dict] = {}
    slots: dict[int, _Slot] = {}

    def spawn() -> None:
        inbox = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(backend, opts.dry_run, inbox, done), daemon=True)
        proc.start()
        slots[proc.pid] = _Slot(proc, inbox)

    def record(i: int, result: dict) -> None:
        finished[i] = sink.write(dict(case=cases[i].name, backend=backend, **asdict(cases[i]), **result))
        detail = result.get("error") or (f"worst {result['worst']} {result['worst_error']:.2e} "
                                         f"(tol {result['tolerance']:.0e}), {result['seconds']:.1f} s")
        print(f"{result['state']:7s} {cases[i].name}: {detail}", flush=True)

    def retire(pid: int, why: Optional[str]) -> None:
        slot = slots.pop(pid)
        if slot.proc.is_alive():
            slot.proc.kill()
        slot.proc.join(1)
        if slot.case is not None and why is not None:
            record(slot.case, dict(state="timeout" if why.startswith("over") else "fail", error=why))
        if pending:
            spawn()

    for _ in range(max(1, min(opts.workers, len(cases)))):
        spawn()
    while len(finished) < len(cases):
        try:
            pid, i, result = done.get(timeout=0.2)
        except queue.Empty:
            pid = None
        if pid in slots:
            if i is None and result is not None:  # a worker's setup failed: so would every other's
                for j in pending + [s.case for s in slots.values() if s.case is not None]:
                    record(j, dict(result))
                pending.clear()
                break
            if i is not None:
                slots[pid].case = None
                record(i, result)
        now = time.time()
        for pid, slot in list(slots.items()):
            if slot.case is None and pending and slot.proc.is_alive():
                slot.case, slot.since = pending.pop(0), now
                slot.inbox.put((slot.case, cases[slot.case]))
            elif slot.case is not None and now - slot.since > opts.case_timeout:
                retire(pid, f"over {opts.case_timeout:.0f} s (its worker was killed)")
            elif not slot.proc.is_alive() and done.empty():
                retire(pid, "its worker died (the log has its last words)")
        if not slots and pending:
            spawn()
        if not slots and not pending and len(finished) < len(cases):
            break
    for slot in slots.values():
        slot.inbox.put(None)
    for slot in slots.values():
        slot.proc.join(5)
        if slot.proc.is_alive():
            slot.proc.kill()
    return [finished[i] for i in sorted(finished)]


# -- counting the compiles ---------------------------------------------------------------

def recorded(c: Case, target: str = "sm90") -> list:
    """The Triton launches of case `c` on a GPU of `target`, as the cost model records them on
    meta tensors (every router and the bank on: the same kernels, or a superset)."""
    from proper_kernels import cost

    seq = c.seq_len or 1
    cc = cost.Case(c.name, c.T, c.d_in, c.d_out, c.E, c.k, c.r, max(c.r_u, 1), min(c.users, c.T // seq),
                   not c.seq_len, True)
    fwd, bwd = cost.record_call(cc, c.dtype, target)
    return [ln for ln in fwd + (bwd if c.train else []) if hasattr(ln, "kernel")]


def specializations(cases: list[Case], target: str = "sm90") -> int:
    """Distinct Triton kernel specializations the cases compile on a GPU (:func:`recorded`),
    each specialized as Triton's JIT does and keyed as the compile gate keys its builds."""
    from proper_kernels.compile_check import _key, _specialise

    keys = set()
    for c in cases:
        for ln in recorded(c, target):
            src, options, _ = _specialise(ln, target)
            keys.add(_key(src, options, target))
    return len(keys)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_correct", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("triton", "cuda"), required=True)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--rows", type=Path, default=None, help="append one JSON line per case to this file")
    p.add_argument("--case-timeout", type=float, default=120.0, help="seconds before a case's worker is killed")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (interpreter / emulator)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these cases")
    p.add_argument("--list", action="store_true", help="print the cases (and the Triton compiles) and exit")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    if args.case_timeout <= 0:
        p.error(f"--case-timeout must be positive, got {args.case_timeout}")
    names = {c.name for c in CASES}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        p.error(f"--only: unknown case(s) {', '.join(unknown)}; the cases are {', '.join(sorted(names))}")
    cases = [c for c in CASES if not args.only or c.name in args.only]
    if args.backend == "cuda":  # the grouped strategy is Triton's; the CUDA backend has one path per shape
        cases = [c for c in cases if c.strategy is None]
    if args.dry_run:
        cases = [c.tiny() for c in cases]
    if args.list:
        for c in cases:
            print(c.name, asdict(c))
        if args.backend == "triton" and not args.dry_run:
            print(f"Triton kernel specializations on sm_90: {specializations(cases)}")
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_correct: needs a CUDA GPU (or --dry-run)", file=sys.stderr)
            return 2
    from benchmarks.rows import summary

    t0 = time.time()
    rows = run_all(cases, args.backend, args)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("ok", "fail", "timeout")}
    bad = [r["case"] for r in rows if r["state"] != "ok"]
    summary(f"{args.backend}: {counts['ok']}/{len(cases)} cases within tolerance, {counts['fail']} failing, "
            f"{counts['timeout']} timed out ({time.time() - t0:.0f} s)" + (f"; not ok: {', '.join(bad)}" if bad else ""))
    return 0 if len(bad) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
