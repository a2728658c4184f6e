"""The one result schema of the benchmarks: a header (device, versions, date, settings) and
rows with the same keys at every level, written as JSON and as a markdown table.

``proper bench`` and ``python -m benchmarks.bench_op`` both write it; a key that does not
apply to a row (say the bytes of a training step) is null, never absent.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

from .timing import Timing

SCHEMA = "proper.apps.bench/2"
KINDS = {"linear": "floor", "base": "floor",
         "proper": "ours", "proper-torch": "ours", "proper-triton": "ours", "proper-cuda": "ours",
         "proper-compile": "ours",
         "peft-moe": "baseline", "peft-mixed": "baseline", "peft-shared": "baseline", "lora": "baseline"}
ROW_FIELDS = ("level", "sweep", "case", "variant", "kind", "device", "dtype", "shape", "backend", "mode",
              "median_ms", "p20_ms", "p80_ms", "reps", "times_ms", "peak_mib", "flops", "bytes", "tflops", "gbps",
              "pct_of_copy", "tokens_per_s", "ratio_to_floor", "speedup_vs_peft", "backward_method", "input_sets",
              "ok", "error", "notes")
HEADER_FIELDS = ("schema", "date", "timestamp_utc", "command", "device", "versions", "peaks", "settings", "notes",
                 "summary", "auto_table", "rows", "seconds")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BASELINE_ORDER = ("peft-moe", "peft-mixed")  # the PEFT row a group's speedup is against


# -- environment --------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name or platform.machine() or 'CPU'} ({torch.get_num_threads()} threads)"


def _git() -> tuple[Optional[str], Optional[bool]]:
    """The commit of the checkout this package runs from (None when it is not one)."""
    here = Path(__file__).resolve().parent
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", Path(__file__).name], cwd=here,
                                 capture_output=True, text=True, timeout=10)
        if tracked.returncode != 0:
            return None, None
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def versions() -> dict:
    import transformers

    import proper
    import proper_kernels

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "proper": proper.__version__,
           "cuda_extension": proper_kernels.cuda_extension_error() or "loaded"}
    for mod in ("triton", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    out["git_commit"], out["git_dirty"] = _git()
    return out


def device_info(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {"type": device.type, "name": device_name(device),
            "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
            "l2_cache_bytes": getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None) if cuda else None}


# -- rows ----------------------------------------------------------------------------------------


def make_row(level: str, sweep: str, case: str, variant: str, device: torch.device, dtype: str, shape: dict,
             backend: Optional[str], mode: str, t: Optional[Timing], *, peak: Optional[float] = None,
             flops: Optional[float] = None, nbytes: Optional[float] = None, tokens: Optional[int] = None,
             backward_method: Optional[str] = None, input_sets: Optional[int] = None,
             error: Optional[str] = None, notes: str = "") -> dict:
    s = t.median_ms * 1e-3 if t is not None and t.median_ms > 0 else None
    row = dict.fromkeys(ROW_FIELDS)
    row.update(level=level, sweep=sweep, case=case, variant=variant, kind=KINDS[variant], device=device.type,
               dtype=dtype, shape=shape, backend=backend, mode=mode, peak_mib=peak, flops=flops, bytes=nbytes,
               backward_method=backward_method, input_sets=input_sets, ok=error is None and t is not None,
               error=error, notes=notes, times_ms=[])
    if t is not None:
        row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps, times_ms=list(t.times_ms))
    if s:
        row["tflops"] = flops / s / 1e12 if flops else None
        row["gbps"] = nbytes / s / 1e9 if nbytes else None
        row["tokens_per_s"] = tokens / s if tokens else None
    return row


def finish_rows(rows: list[dict], peaks: dict) -> list[dict]:
    """Fill the columns that compare rows: % of the measured copy bandwidth, and within each
    (level, sweep, case, mode) the time over the floor's and the PEFT baseline's over ours."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["level"], r["sweep"], r["case"], r["mode"]), {})[r["variant"]] = r
        if r["gbps"] is not None and peaks.get("copy_gbps"):
            r["pct_of_copy"] = 100 * r["gbps"] / peaks["copy_gbps"]
    for group in groups.values():
        floor = next((r["median_ms"] for r in group.values() if r["kind"] == "floor"), None)
        peft = next((group[v]["median_ms"] for v in BASELINE_ORDER if v in group), None)
        for r in group.values():
            m = r["median_ms"]
            if m is None or m <= 0:
                continue
            r["ratio_to_floor"] = m / floor if floor and floor > 0 else None
            r["speedup_vs_peft"] = peft / m if peft and peft > 0 else None
    return rows


def header(device: torch.device, settings: dict, peaks: dict, command: str, notes: list,
           now: Optional[_dt.datetime] = None) -> dict:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    out = dict.fromkeys(HEADER_FIELDS)
    out.update(schema=SCHEMA, date=now.date().isoformat(), timestamp_utc=now.isoformat(timespec="seconds"),
               command=command, device=device_info(device), versions=versions(), peaks=peaks, settings=settings,
               notes=list(notes), summary={}, auto_table=[], rows=[])
    return out


# -- report ---------------------------------------------------------------------------------------


def _fmt(v: Optional[float], spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


def _summary_lines(s: dict) -> list[str]:
    lines = [f"## Personalization overhead ({s['model']})", "",
             "| variant | adapter overhead ms (median) | p20-p80 ms |", "|---|---|---|",
             f"| base (no adapters, {s['base_ms']:.2f} ms) | - | - |"]
    ok = s.get("adapter_overhead_resolved", {})
    for n, v in s["adapter_overhead_ms"].items():
        lo, hi = s["adapter_overhead_p20_p80_ms"][n]
        lines.append(f"| {n} | {v:.2f} | {lo:.2f}-{hi:.2f} |" if ok.get(n, True) else
                     f"| {n} | not resolved at this noise | {lo:.2f}-{hi:.2f} |")
    ratio = s["overhead_ratio_peft_mixed_over_proper"]
    lines += ["", "PEFT `adapter_names` overhead / proper overhead: "
              + (f"{ratio:.1f}x" if ratio is not None else
                 "not resolved at this noise (an overhead's p20..p80 spread crosses zero)"), ""]
    if "train_step_ms" in s:
        t = s["train_step_ms"]
        lines += [f"Training step (same model, {s['model'].split(',')[0]}, 4 experts top-2 on the FFN): "
                  f"plain LoRA {t['lora']:.1f} ms, proper {t['proper']:.1f} ms "
                  f"({s['train_proper_over_lora']:.2f}x LoRA), PEFT-style mixture {t['peft-moe']:.1f} ms "
                  f"({s['train_peft_moe_over_proper']:.2f}x proper).  "]
    if "generate_tokens_per_s" in s:
        lines += ["Batched generation, one user per sequence: " + ", ".join(
            f"{n} {v:.0f} tokens/s" for n, v in s["generate_tokens_per_s"].items())
            + f" ({s['generate_proper_over_peft_mixed']:.2f}x)."]
    return lines + [""]


def markdown(result: dict) -> str:
    h = result
    v, pk = h["versions"], h["peaks"]
    lines = [f"# proper bench: {h['device']['name']} ({h['device']['type']}), {h['settings']['dtype']}, {h['date']}",
             "", f"versions: {', '.join(f'{k} {val}' for k, val in v.items())}  ",
             f"peaks measured in this run: matmul {pk['matmul_tflops']:.3f} TFLOP/s ({pk['matmul']}), "
             f"copy {pk['copy_gbps']:.1f} GB/s ({pk['copy']})  ",
             f"timer: {h['settings']['timer']}  ", f"command: `{h['command']}`", ""]
    op_cases = {r["case"]: r["shape"] for r in h["rows"] if r["level"] == "op"}
    for case, sh in op_cases.items():
        lines.append(f"- `{case}`: T={sh['tokens']} ({sh['batch']}x{sh['seq']}), in={sh['in']}, out={sh['out']}, "
                     f"E={sh['experts']}, k={sh['top_k']}, r={sh['rank']}, r_u={sh['user_rank']}, "
                     f"{sh['users']} users in the batch of a bank of {sh['bank']}")
    lines += [f"- note: {n}" for n in h["notes"]]
    if op_cases or h["notes"]:
        lines.append("")
    if h.get("summary"):
        lines += _summary_lines(h["summary"])
    lines += ["## All rows", "", "| level | case | mode | variant | kind | backend | median ms | p20-p80 ms | reps "
              "| x peft | x floor | TFLOP/s | % peak | GB/s (% copy) | peak MiB | ok |",
              "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    peak = pk["matmul_tflops"]
    for r in h["rows"]:
        pct = None if r["tflops"] is None else 100 * r["tflops"] / peak
        spread = "-" if r["p20_ms"] is None else f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"
        gb = _fmt(r["gbps"], ".1f") + ("" if r["pct_of_copy"] is None else f" ({r['pct_of_copy']:.1f}%)")
        ok = "ok" if r["ok"] else "ERROR"
        if (r["backward_method"] or "").startswith("full_minus_forward"):
            ok += " (full - forward)"
        lines.append(f"| {r['level']} | {r['case']} | {r['mode']} | {r['variant']} | {r['kind']} | {r['backend']} "
                     f"| {_fmt(r['median_ms'])} | {spread} | {_fmt(r['reps'], 'd')} "
                     f"| {_fmt(r['speedup_vs_peft'], '.2f')} | {_fmt(r['ratio_to_floor'], '.2f')} "
                     f"| {_fmt(r['tflops'], '.3f')} | {_fmt(pct, '.1f')} | {gb} | {_fmt(r['peak_mib'], '.1f')} "
                     f"| {ok} |")
    errors = dict.fromkeys(f"{r['case']} {r['mode']} {r['variant']}: {r['error']}" for r in h["rows"] if r["error"])
    if errors:
        lines += ["", "Errors:"] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


def _finite(obj):
    """Strict JSON: a non-finite float becomes its name."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write(result: dict, json_path: Path) -> list[Path]:
    """Write `result` as JSON at json_path and its markdown table next to it (.md)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_finite({k: v for k, v in result.items() if k in HEADER_FIELDS}), indent=1,
                                    allow_nan=False) + "\n")
    md = json_path.with_suffix(".md")
    md.write_text(markdown(result))
    return [json_path, md]
