"""The compile gate: every Triton kernel built for sm_90 and sm_80, with no GPU.

    python -m proper_kernels.compile_check [--full] [--out FILE] [--jobs N]

For each goal case (``CASES``), dtype and target it runs the real host code of the fused
op's forward and backward on ``meta`` tensors inside ``launch.recording``, so the launches
are exactly those a GPU would get (kernels, grids, block sizes, warps, stages). Each launch
is specialised the way Triton's JIT specialises it and compiled with ``triton.compile`` for
``GPUTarget("cuda", 90 | 80, 32)``. From each build it reads:

- registers, stack and local memory (spills) and shared memory, from the cubin
  (``cuobjdump -res-usage``, shipped with triton);
- every dot and what it lowered to, from the TTGIR: ``wgmma`` (``ttng.warp_group_dot``),
  ``mma`` (``tt.dot`` on an #mma layout: mma.sync) or ``fma`` (a blocked layout: CUDA cores);
- the tensor-core instructions in the SASS (HGMMA, HMMA).

It fails (exit 1) on a compile error, a spill or any local memory, shared memory past the
target's limit, a 16-bit dot off the tensor cores, and a prefill expert or user dot that is
not wgmma on sm_90. (fp32 inputs run IEEE fp32 dots on CUDA cores unless TF32 is allowed;
``--full`` reports them.) With ``--cuda`` it also runs the gate of the built CUDA extension
(``proper_kernels.cuda_gate``: tensor-core instructions in every 16-bit prefill kernel, no
stack or local memory) and fails if the extension is not built; without it, a built
extension is gated all the same. It writes one row per kernel, case, dtype and target to ``--out``
(default ``benchmarks/results/kernels-sm90-sm80.md``). Builds are cached (Triton's own
cache, plus the resource reads under ``~/.cache/proper/compile_check``); bf16 and fp16 by
default, fp32 too with ``--full``. Run it without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

SHARED_LIMIT = {"sm90": 232448, "sm80": 166912}  # bytes per block (opt-in maximum)
CAPABILITY = {"sm90": 90, "sm80": 80}


from .cost import CASES, Case, record_call  # noqa: E402  (the goal cases)

# The standalone router op (proper_kernels.router_topk): (name, tokens, experts, k).
ROUTER_CASES = (("router-E8-k2", 8192, 8, 2), ("router-E64-k8", 8192, 64, 8), ("router-E1024-k8", 8192, 1024, 8))

# Kernels whose dots are the prefill expert and user GEMMs.
PREFILL_WGMMA = ("_shrink", "_expand")


def _bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def record(name: str, dtype_name: str, target: str) -> list:
    """The kernel launches of one forward and backward of the fused op, or of the router op,
    for the case called `name` (meta tensors)."""
    router = next((c for c in ROUTER_CASES if c[0] == name), None)
    if router is None:
        fwd, bwd = record_call(next(c for c in CASES if c.name == name), dtype_name, target)
        return [ln for ln in fwd + bwd if hasattr(ln, "kernel")]
    import torch

    from . import launch, triton_router

    _, T, E, k = router
    logits = torch.empty(T, E, device="meta", dtype=getattr(torch, dtype_name))
    with launch.recording(target) as launches:
        gates, idx = triton_router.router_topk_forward(logits, k)
        triton_router.router_topk_backward(logits, idx, torch.empty_like(gates))
    return launches


def _specialise(launch_, target: str):
    """(ASTSource, options) as Triton's JIT would build them for this launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch_.kernel
    gpu = GPUTarget("cuda", CAPABILITY[target], 32)
    backend = make_backend(gpu)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch_.consts, num_warps=launch_.num_warps, num_stages=launch_.num_stages)
    bound, specialization, options = binder(*launch_.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options, gpu


def _key(src, options, target: str) -> str:
    import triton

    text = json.dumps([src.fn.cache_key, str(sorted(src.signature.items())), str(sorted(src.constants.items())),
                       str(sorted(src.attrs.items())), str(sorted(options.__dict__.items())), target,
                       triton.__version__], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _dots(ttgir: str) -> list[tuple[str, str]]:
    """(kind, operand dtype) of every dot in the TTGIR."""
    out = []
    for line in ttgir.splitlines():
        if "ttng.warp_group_dot " in line:
            m = re.search(r"(?:memdesc|tensor)<\d+x\d+x(\w+),", line.split(" : ", 1)[1] if " : " in line else line)
            out.append(("wgmma", m.group(1) if m else "?"))
        elif re.search(r"= tt\.dot ", line):
            sig = line.split(" : ", 1)[1] if " : " in line else line
            m = re.search(r"tensor<\d+x\d+x(\w+),\s*#ttg\.dot_op<\{opIdx = 0, parent = #(\w+)", sig)
            dt = m.group(1) if m else "?"
            kind = "mma" if m and m.group(2).startswith("mma") else "fma"
            out.append((kind, dt))
    return out


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    vals = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    return dict(regs=vals.get("REG", 0), stack=vals.get("STACK", 0), local=vals.get("LOCAL", 0),
                shared=vals.get("SHARED", 0), hgmma=len(re.findall(r"\bHGMMA\b", sass)),
                hmma=len(re.findall(r"\bHMMA\b", sass)))


def _cache_dir() -> Path:
    root = os.environ.get("PROPER_COMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "proper",
                                                                  "compile_check")
    return Path(root)


def build(job: tuple) -> dict:
    """Compile one launch (a worker process): its resources and dots, or its error."""
    case_name, dtype_name, target, index = job
    launch_ = record(case_name, dtype_name, target)[index]
    row = dict(kernel=launch_.name, case=case_name, dtype=dtype_name, target=target, grid=list(launch_.grid),
               num_warps=launch_.num_warps, num_stages=launch_.num_stages, note=launch_.note)
    try:
        import triton

        src, options, gpu = _specialise(launch_, target)
        cache = _cache_dir() / (_key(src, options, target) + ".json")
        if cache.exists():
            row.update(json.loads(cache.read_text()))
            return row
        compiled = triton.compile(src, target=gpu, options=options.__dict__)
        info = _resources(compiled.asm["cubin"])
        info["dots"] = _dots(compiled.asm["ttgir"])
        info["shared"] = max(info["shared"], int(compiled.metadata.shared))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(info))
        row.update(info)
    except Exception as e:  # reported as a failing row
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return row


def problems(row: dict) -> list[str]:
    """Why a row fails the gate (empty: it passes)."""
    if "error" in row:
        return ["compile error: " + row["error"]]
    out = []
    if row["stack"] or row["local"]:
        out.append(f"spills: stack {row['stack']} B, local {row['local']} B")
    if row["shared"] > SHARED_LIMIT[row["target"]]:
        out.append(f"shared memory {row['shared']} B > {SHARED_LIMIT[row['target']]} B")
    for kind, dt in row["dots"]:
        if kind == "fma" and dt in ("bf16", "f16"):
            out.append(f"a {dt} dot on CUDA cores (FMA)")
    case = next((c for c in CASES if c.name == row["case"]), None)
    if (case is not None and case.prefill and row["target"] == "sm90" and row["kernel"] in PREFILL_WGMMA and row["dtype"] != "float32"
            and any(kind != "wgmma" for kind, _ in row["dots"])):
        out.append("a prefill expert or user dot that is not wgmma on sm_90")
    return out


def jobs(dtypes: tuple[str, ...]) -> list[tuple]:
    out = []
    for name in [c.name for c in CASES] + [c[0] for c in ROUTER_CASES]:
        for dtype in dtypes:
            for target in ("sm90", "sm80"):
                n = len(record(name, dtype, target))
                out += [(name, dtype, target, i) for i in range(n)]
    return out


def table(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| kernel | case | dtype | target | grid | warps/stages | regs | spill (stack/local B) | shared B "
             "| dots (kind:dtype) | HGMMA/HMMA | gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        why = problems(r)
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['case']} | {r['dtype']} | {r['target']} | {r['grid']} | "
                         f"{r['num_warps']}/{r['num_stages']} | - | - | - | - | - | FAIL: {why[0]} |")
            continue
        dots = ", ".join(f"{k}:{d}" for k, d in r["dots"]) or "-"
        lines.append(
            f"| {r['kernel']} | {r['case']} | {r['dtype']} | {r['target']} | {'x'.join(map(str, r['grid']))} | "
            f"{r['num_warps']}/{r['num_stages']} | {r['regs']} | {r['stack']}/{r['local']} | {r['shared']} | {dots} | "
            f"{r['hgmma']}/{r['hmma']} | {'ok' if not why else 'FAIL: ' + '; '.join(why)} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proper_kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="fp32 too")
    parser.add_argument("--out", default="benchmarks/results/kernels-sm90-sm80.md", help="the table to write")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--cuda", action="store_true",
                        help="also gate the built CUDA extension (proper_kernels.cuda_gate); fail if it is not built")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: run it without TRITON_INTERPRET=1 (it compiles for the GPU)", file=sys.stderr)
        return 2
    import torch
    import triton

    dtypes = ("bfloat16", "float16") + (("float32",) if args.full else ())
    todo = jobs(dtypes)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(build, todo))
    failing = [r for r in rows if problems(r)]
    header = (f"# Triton kernels compiled for sm_90 and sm_80 (no GPU)\n\n"
              f"`python -m proper_kernels.compile_check{' --full' if args.full else ''}` with triton "
              f"{triton.__version__}, torch {torch.__version__}: {len(rows)} builds, {len(failing)} failing. One "
              "forward and one backward of the fused op per case, with the launch configurations the launchers "
              "pick on a GPU. Cases (T tokens, in, out, E, k, r, r_u, users): "
              + "; ".join(f"{c.name} ({c.T}, {c.d_in}, {c.d_out}, {c.E}, {c.k}, {c.r}, {c.r_u}, {c.users}"
                          f"{' per token' if c.per_token else ''})" for c in CASES)
              + "; the router op alone: " + ", ".join(f"{n} (T={T}, E={E}, k={k})" for n, T, E, k in ROUTER_CASES)
              + ".")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = table(rows, header)
    from . import cuda_gate

    cuda_rows, cuda_failures = cuda_gate.check()
    if cuda_rows or args.cuda:
        text += "\n" + cuda_gate.table(cuda_rows, cuda_failures)
    else:
        text += "\n## CUDA extension (proper_kernels._C)\n\nNot built here, so not gated.\n"
        cuda_failures = []
    out.write_text(text)
    for r in failing:
        print(f"FAIL {r['kernel']} {r['case']} {r['dtype']} {r['target']}: {'; '.join(problems(r))}", file=sys.stderr)
    for f in cuda_failures:
        print(f"FAIL CUDA extension: {f}", file=sys.stderr)
    print(f"compile_check: {len(rows)} Triton builds, {len(failing)} failing; CUDA extension: {len(cuda_rows)} "
          f"kernels x targets, {len(cuda_failures)} failing; table in {out}")
    return 1 if failing or cuda_failures else 0


if __name__ == "__main__":
    sys.exit(main())
