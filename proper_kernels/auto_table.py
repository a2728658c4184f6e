"""What ``backend="auto"`` runs on a GPU: a table of (phase, token range) -> backend.

Phases: ``decode`` (inference, few tokens), ``prefill`` (inference, many tokens), ``train``
(some input needs a gradient: the forward and its backward) and ``router`` (the standalone
``router_topk`` op). A row covers ``min_tokens <= T <= max_tokens`` (None: no bound).

The default table (below) was chosen without a GPU, from the launch plans
(``proper bench --plan``) and the compile gate (``python -m proper_kernels.compile_check``):

  decode   cuda    Memory-bound at any backend. The CUDA decode path is three launches
                   from C++ under one dispatcher op, each over >= 2 CTAs per SM with
                   16-byte loads; the Triton path pays Python launch overhead per kernel,
                   which at 64 tokens is of the order of the kernels' own time.
  prefill  triton  Both backends move about the floor's bytes; the compile gate shows the
                   Triton dots as wgmma on sm_90 with software-pipelined loads, while the
                   CUDA kernels use mma.sync (HMMA) with single-stage shared-memory tiles.
  train    triton  The same reasons, and the Triton backward reads x and dy once for all
                   weight gradients (the CUDA backend's weight gradients are separate
                   cuBLAS GEMMs that read them again).
  router   cuda    One warp per token, launched from C++.

``proper bench --device cuda`` times every available backend on each phase's cases and
writes the measured table (``write_measured``, default ``~/.cache/proper/auto_table.json``;
``PROPER_AUTO_TABLE`` names another file). ``select_backend`` then reads it for the GPU it
was measured on, and keeps the default for any other GPU.

Design: docs/DESIGN.md#auto (how `auto` chooses).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

SCHEMA = "proper.auto_table/1"
PHASES = ("decode", "prefill", "train", "router")
# Inference calls of at most this many tokens are the decode phase.
DECODE_TOKENS = 256


@dataclass(frozen=True)
class Row:
    phase: str
    min_tokens: int
    max_tokens: Optional[int]
    backend: str
    reason: str

    def covers(self, phase: str, tokens: Optional[int]) -> bool:
        if phase != self.phase:
            return False
        if tokens is None:
            return True
        return tokens >= self.min_tokens and (self.max_tokens is None or tokens <= self.max_tokens)


DEFAULT = (
    Row("decode", 0, 256, "cuda", "default (no GPU measurement): decode is memory-bound on every backend; the "
        "CUDA path is three C++ launches that each cover the GPU, Triton adds Python launch overhead per kernel"),
    Row("decode", 257, None, "triton", "default (no GPU measurement): past 256 tokens decode is prefill"),
    Row("prefill", 0, None, "triton", "default (no GPU measurement): the compile gate shows wgmma on sm_90 and "
        "pipelined loads for Triton, mma.sync with single-stage tiles for the CUDA kernels; both move ~1.05x the "
        "floor bytes (proper bench --plan)"),
    Row("train", 0, None, "triton", "default (no GPU measurement): as prefill, and the Triton backward reads x and "
        "dy once for all weight gradients"),
    Row("router", 0, None, "cuda", "default (no GPU measurement): one warp per token, launched from C++"),
)


def path() -> Path:
    env = os.environ.get("PROPER_AUTO_TABLE")
    return Path(env) if env else Path.home() / ".cache" / "proper" / "auto_table.json"


def _device_name(device) -> Optional[str]:
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


_loaded: dict = {}


def measured(device_name: Optional[str]) -> Optional[tuple[Row, ...]]:
    """The measured rows for the GPU named `device_name`, or None (no file, another GPU, or
    a file that does not parse: the default table then applies)."""
    if device_name is None:
        return None
    p = path()
    try:
        stamp = p.stat().st_mtime_ns
    except OSError:
        return None
    key = (str(p), stamp)
    if key not in _loaded:
        try:
            data = json.loads(p.read_text())
            if data.get("schema") != SCHEMA:
                raise ValueError(f"schema {data.get('schema')!r}")
            tables = {name: tuple(Row(**r) for r in rows) for name, rows in data["devices"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            tables = {}
        _loaded.clear()
        _loaded[key] = tables
    return _loaded[key].get(device_name)


def lookup(device, phase: str, tokens: Optional[int]) -> list[Row]:
    """The rows that apply, measured first: the caller takes the first available backend."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    rows = [r for r in (measured(_device_name(device)) or ()) if r.covers(phase, tokens)]
    rows += [r for r in DEFAULT if r.covers(phase, tokens)]
    return rows


def write_measured(device_name: str, rows: list[Row], target: Optional[Path] = None) -> Path:
    """Store `rows` as the measured table of `device_name` (other GPUs' tables are kept)."""
    for r in rows:
        if r.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {r.phase!r}")
    p = Path(target) if target else path()
    data = {"schema": SCHEMA, "devices": {}}
    if p.is_file():
        try:
            old = json.loads(p.read_text())
            if old.get("schema") == SCHEMA:
                data["devices"] = old.get("devices", {})
        except ValueError:
            pass
    data["devices"][device_name] = [asdict(r) for r in rows]
    data["written"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, p)
    return p


# -- measuring ---------------------------------------------------------------------------------

# One case per phase: (phase, tokens, in, out, E, k, r, r_u, users).
CASES = (
    ("decode", 64, 4096, 4096, 8, 2, 16, 16, 64),
    ("prefill", 8192, 4096, 4096, 8, 2, 16, 16, 8),
    ("train", 4096, 4096, 4096, 8, 2, 16, 16, 8),
    ("router", 8192, 0, 0, 8, 2, 0, 0, 1),
)


def measure(device="cuda", dtype=None, quick: bool = False) -> list[Row]:
    """Time every backend available on `device` for each phase's case (CUDA events through
    triton.testing.do_bench) and return the rows that pick the fastest."""
    import torch

    from . import dispatch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("measuring the auto table needs a CUDA device")
    from triton.testing import do_bench

    dtype = dtype or torch.bfloat16
    rows = []
    for phase, T, d_in, d_out, E, k, r, r_u, users in CASES:
        if quick:
            T = min(T, 1024) if phase != "decode" else T
        g = torch.Generator(device=device).manual_seed(0)
        rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g) * 0.1  # noqa: E731
        times = {}
        for name in dispatch.available_backends(device, dtype):
            if name == "torch" and phase != "router":
                continue  # the reference is never the fastest on a GPU; it stays the fallback
            if phase == "router":
                logits = rnd(T, E)
                fn = lambda: dispatch.router_topk(logits, k, backend=name)  # noqa: E731
            else:
                x, base = rnd(T, d_in), rnd(T, d_out)
                A, B = rnd(E, r, d_in), rnd(E, d_out, r)
                wx, ru, wh = rnd(E, d_in), rnd(users + 1, E), rnd(E, r_u)
                ua, ub = rnd(users, r_u, d_in), rnd(users, d_out, r_u)
                uid = torch.arange(T, device=device) % users
                params = [A, B, wx, ua, ub]
                if phase == "train":
                    for p_ in params:
                        p_.requires_grad_(True)
                kw = dict(top_k=k, router_x=wx, router_user=ru, router_h=wh, user_ids=uid, user_A=ua, user_B=ub,
                          user_scaling=1.0, backend=name)

                def fn(x=x, base=base, A=A, B=B, kw=kw, phase=phase):
                    y = dispatch.proper_linear(x, base, A, B, 1.0, **kw)
                    if phase == "train":
                        y.float().sum().backward()

                if phase != "train":
                    fn = torch.no_grad()(fn)
            try:
                times[name] = do_bench(fn, warmup=5 if quick else 25, rep=20 if quick else 100)
            except Exception as e:  # noqa: BLE001 - a backend that fails a phase cannot win it
                times[name] = float("inf")
                print(f"proper bench: {name} failed the {phase} case: {type(e).__name__}: {e}")
        best = min(times, key=times.get)
        shown = ", ".join(f"{n} {t * 1e3:.1f} us" for n, t in sorted(times.items(), key=lambda kv: kv[1]))
        lo, hi = (0, 256) if phase == "decode" else (0, None)
        rows.append(Row(phase, lo, hi, best, f"measured {_dt.date.today()}: {shown} (T={T}, {dtype})".replace(
            "torch.", "")))
    return rows
