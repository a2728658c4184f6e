"""The SASS and resource gate of the built CUDA extension (proper_kernels._C), with no GPU.

    python -m proper_kernels.cuda_gate [--out FILE]

It reads the extension's cubins for sm_80 and sm_90 with ``cuobjdump -res-usage`` and
``cuobjdump -sass`` (shipped with triton) and, for every kernel and target: registers,
stack and local memory, shared memory, and the tensor-core instructions (HMMA, HGMMA).

It fails (exit 1) when a kernel uses any stack or local memory (spills or a local array),
when a 16-bit instantiation of a prefill kernel (``prefill_*``: the tensor-core path) has no
tensor-core instruction (HMMA on sm_80, HGMMA or HMMA on sm_90), or when the extension or a
target is missing. The fp32 instantiations of the prefill kernels use FMAs by design (fp32
is not a tensor-core type without TF32) and are listed as such. ``compile_check`` runs this
gate too and writes its rows beside the Triton rows of
``benchmarks/results/kernels-sm90-sm80.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

TARGETS = ("sm_80", "sm_90")
# Kernels that must run on tensor cores in their 16-bit instantiations.
TENSOR_CORE_KERNELS = ("prefill_shrink_kernel", "prefill_expand_kernel", "prefill_bwd_dh_kernel",
                       "prefill_bwd_dx_kernel")
HALF_TYPES = {"6__half": "fp16", "13__nv_bfloat16": "bf16", "N3c104HalfE": "fp16", "N3c108BFloat16E": "bf16"}


def _bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def extension_path() -> Optional[str]:
    spec = importlib.util.find_spec("proper_kernels._C")
    return spec.origin if spec is not None else None


def _short(mangled: str) -> tuple[str, str]:
    """(kernel name, its storage type) from a mangled name: the last component of the
    nested name _ZN<len><id>...I<template args>E..., then the dtype of its first argument."""
    name, i = mangled, 3 if mangled.startswith("_ZN") else len(mangled)
    while i < len(mangled) and mangled[i].isdigit():
        j = i
        while mangled[j].isdigit():
            j += 1
        n = int(mangled[i:j])
        name, i = mangled[j:j + n], j + n
    rest = mangled[i:]
    dtype = "fp32"
    for key, dt in HALF_TYPES.items():
        if rest.startswith("I" + key):
            dtype = dt
    return name, dtype


def read(so: str) -> list[dict]:
    """One row per (kernel instantiation, target) of the extension at `so`."""
    res = subprocess.run([_bin("cuobjdump"), "-res-usage", so], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([_bin("cuobjdump"), "-sass", so], capture_output=True, text=True, check=True).stdout
    rows: dict[tuple[str, str], dict] = {}
    arch = None
    lines = res.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m and arch and i + 1 < len(lines):
            usage = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", lines[i + 1]))
            rows[(m.group(1), arch)] = dict(
                mangled=m.group(1), target=arch, regs=int(usage.get("REG", 0)), stack=int(usage.get("STACK", 0)),
                local=int(usage.get("LOCAL", 0)), shared=int(usage.get("SHARED", 0)), hmma=0, hgmma=0)
    arch = fn = None
    for line in sass.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = m.group(1)
            continue
        if fn and arch and (fn, arch) in rows:
            if "HGMMA" in line:
                rows[(fn, arch)]["hgmma"] += 1
            elif "HMMA" in line:
                rows[(fn, arch)]["hmma"] += 1
    names = _demangle([r["mangled"] for r in rows.values()])
    out = []
    for r in rows.values():
        r["kernel"], r["dtype"] = _short(r["mangled"])
        r["instance"] = names.get(r["mangled"], r["mangled"])
        out.append(r)
    return sorted(out, key=lambda r: (r["kernel"], r["dtype"], r["target"], r["instance"]))


def _demangle(mangled: list[str]) -> dict[str, str]:
    """Readable template instantiations (kernel<args>, without the parameter list), by c++filt
    where it is installed."""
    try:
        text = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True,
                              check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for m, d in zip(mangled, text):
        d = re.sub(r"^void ", "", d)
        depth, cut = 0, len(d)
        for j, ch in enumerate(d):  # drop the function's parameter list: the last top-level "(...)"
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "(" and depth == 0:
                cut = j
        out[m] = d[:cut].replace("proper::", "").replace("(anonymous namespace)::", "")
    return out


def needs_tensor_cores(row: dict) -> bool:
    return row["kernel"] in TENSOR_CORE_KERNELS and row["dtype"] in ("fp16", "bf16")


def problems(row: dict) -> list[str]:
    out = []
    if row["stack"] or row["local"]:
        out.append(f"stack {row['stack']} B, local {row['local']} B")
    if needs_tensor_cores(row) and row["hmma"] + row["hgmma"] == 0:
        out.append("a prefill kernel with no tensor-core instruction")
    return out


def check(so: Optional[str] = None) -> tuple[list[dict], list[str]]:
    """(rows, failures) of the gate for the extension at `so` (default: the installed one)."""
    so = so or extension_path()
    if so is None:
        return [], ["proper_kernels._C is not built (PROPER_BUILD_CUDA=1 pip install --no-build-isolation -e .)"]
    rows = read(so)
    failures = [f"{r['kernel']} {r['dtype']} {r['target']}: {'; '.join(problems(r))}" for r in rows if problems(r)]
    for target in TARGETS:
        if not any(r["target"] == target for r in rows):
            failures.append(f"the extension has no {target} code")
        for k in TENSOR_CORE_KERNELS:
            for dt in ("fp16", "bf16"):
                if not any(r["target"] == target and r["kernel"] == k and r["dtype"] == dt for r in rows):
                    failures.append(f"{k} {dt} is missing for {target}")
    return rows, failures


def table(rows: list[dict], failures: list[str]) -> str:
    import torch

    lines = [f"## CUDA extension (proper_kernels._C)\n",
             f"`python -m proper_kernels.cuda_gate`, torch {torch.__version__} (CUDA {torch.version.cuda}): "
             f"{len(rows)} kernels x targets, {len(failures)} failing. Gate: no stack or local memory in any "
             "kernel; tensor-core instructions in every 16-bit prefill kernel (the fp32 instantiations use FMAs "
             "by design).", "",
             "| kernel | dtype | target | regs | stack/local B | shared B (static) | HGMMA/HMMA | gate |",
             "|---|---|---|---|---|---|---|---|"]
    rows = sorted(rows, key=lambda r: (r["instance"], r["target"]))
    for r in rows:
        why = problems(r)
        note = "ok" if not why else "FAIL: " + "; ".join(why)
        if not why and r["kernel"] in TENSOR_CORE_KERNELS and r["dtype"] == "fp32":
            note = "ok (fp32: FMA)"
        lines.append(f"| `{r['instance']}` | {r['dtype']} | {r['target']} | {r['regs']} | {r['stack']}/{r['local']} | "
                     f"{r['shared']} | {r['hgmma']}/{r['hmma']} | {note} |")
    for f in failures:
        if not any(f.startswith(f"{r['kernel']} {r['dtype']} {r['target']}:") for r in rows):
            lines.append(f"\nFAIL: {f}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proper_kernels.cuda_gate", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="also write the table here")
    parser.add_argument("--so", default=None, help="the extension to read (default: the installed one)")
    args = parser.parse_args(argv)
    rows, failures = check(args.so)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table(rows, failures))
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    print(f"cuda_gate: {len(rows)} kernels x targets, {len(failures)} failing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
