"""benchmarks.gpu_check's compute-sanitizer command lines and cases, checked on the CPU: the
tool, the environment and the kernel filters of each command; every kernel named in a filter
exists (csrc/, proper_kernels/triton_*.py), every CUDA kernel that declares block-shared
memory is in racecheck's, and the filters match the built extension's mangled names; the
"tiles" case has at least two tiles, the last one partial, in every dimension a kernel tiles."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.rows import RowSink, read_rows

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")


def csrc_kernels() -> dict[str, str]:
    """Every __global__ kernel of csrc/ (the sources the extension compiles): name -> body."""
    out = {}
    for f in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")):
        text = f.read_text()
        for m in GLOBAL.finditer(text):
            start = text.index("{", m.end())
            depth, i = 0, start
            while True:
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                if depth == 0:
                    break
                i += 1
            out[m.group(1)] = text[start:i + 1]
    return out


def split(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(compute-sanitizer's options, its kernel filters, the command it runs)."""
    app = argv.index(sys.executable)
    opts, filters, i = [], [], 1
    while i < app:
        if argv[i] == "--kernel-name":
            filters.append(argv[i + 1])
        else:
            opts += argv[i:i + 2]
        i += 2
    return opts, filters, argv[app:]


def cuda_names(filters: list[str]) -> list[str]:
    """The CUDA kernels of `kns=<length><name>` filters (the length checked)."""
    out = []
    for f in filters:
        m = re.fullmatch(r"kns=(\d+)(\w+)", f)
        if m:
            assert int(m.group(1)) == len(m.group(2)), f
            out.append(m.group(2))
    return out


def option(opts: list[str], name: str) -> str:
    return opts[opts.index(name) + 1]


@pytest.mark.parametrize("size", ["small", "tiles"])
def test_memcheck_checks_our_kernels_without_the_caching_allocator(size):
    argv, env = gpu_check.sanitizer_argv("memcheck", size, cuda_only=False)
    assert argv[0] == "compute-sanitizer"
    opts, filters, app = split(argv)
    assert option(opts, "--tool") == "memcheck" and int(option(opts, "--error-exitcode")) not in (0, 1, 2)
    assert int(option(opts, "--padding")) >= 4096
    assert option(opts, "--target-processes") == "application-only"
    assert env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1" and env[gpu_check.SANITIZER_ENV] == "memcheck"
    assert app == [sys.executable, "-m", "benchmarks.gpu_check", "--size", size]
    assert sorted(cuda_names(filters)) == sorted(gpu_check.CUDA_KERNELS)
    assert sorted(f[len("kne="):] for f in filters if f.startswith("kne=")) == sorted(gpu_check.TRITON_KERNELS)
    assert all(f.startswith(("kns=", "kne=")) and "," not in f for f in filters)  # one kernel a filter

    argv, env = gpu_check.sanitizer_argv("memcheck", size, cuda_only=True)
    opts, filters, app = split(argv)
    assert app[-1] == "--cuda-only" and not [f for f in filters if f.startswith("kne=")]
    assert env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"


def test_racecheck_checks_the_cuda_kernels_that_use_shared_memory():
    argv, env = gpu_check.sanitizer_argv("racecheck", "tiles", cuda_only=True)
    opts, filters, app = split(argv)
    assert argv[0] == "compute-sanitizer" and option(opts, "--tool") == "racecheck"
    assert int(option(opts, "--error-exitcode")) not in (0, 1, 2)
    assert env == {gpu_check.SANITIZER_ENV: "racecheck"}
    assert app == [sys.executable, "-m", "benchmarks.gpu_check", "--size", "tiles", "--cuda-only"]
    names = cuda_names(filters)
    assert len(names) == len(filters) and sorted(names) == sorted(gpu_check.SHARED_MEMORY_KERNELS)
    kernels = csrc_kernels()
    missing = sorted(set(names) - set(kernels))
    assert not missing, f"racecheck names kernels that csrc/ no longer has (renamed?): {missing}"
    shared = {k for k, body in kernels.items() if "__shared__" in body or "PROPER_DYNAMIC_SMEM" in body}
    assert shared == set(names), f"declare shared memory but not in the list: {sorted(shared - set(names))}"


def test_the_kernel_lists_are_those_of_the_sources():
    assert sorted(gpu_check.CUDA_KERNELS) == sorted(csrc_kernels())
    launched = set()
    for f in sorted((ROOT / "proper_kernels").glob("triton_*.py")):
        module = __import__(f"proper_kernels.{f.stem}", fromlist=["_"])
        for node in ast.walk(ast.parse(f.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "launch"
                    and node.args and isinstance(node.args[0], ast.Name)):
                name = node.args[0].id
                assert getattr(module, name).fn.__name__ == name  # the name in the cubin
                launched.add(name)
    assert launched == set(gpu_check.TRITON_KERNELS)


def test_sanitizer_argv_refuses_an_unknown_tool_or_size():
    with pytest.raises(ValueError, match="tool"):
        gpu_check.sanitizer_argv("initcheck", "small", cuda_only=False)
    with pytest.raises(ValueError, match="size"):
        gpu_check.sanitizer_argv("memcheck", "huge", cuda_only=False)
    with pytest.raises(ValueError, match="size"):
        gpu_check.make_case("cpu", "huge")


def test_the_cuda_filters_match_the_built_extensions_kernels():
    """Each filter matches some kernel of the extension's cubins, and each kernel exactly one
    filter (racecheck: exactly the shared-memory kernels' instantiations)."""
    from proper_kernels import cuda_gate

    so = cuda_gate.extension_path()
    if so is None or not Path(cuda_gate._bin("cuobjdump")).exists():
        pytest.skip("needs the built extension and cuobjdump")
    out = subprocess.run([cuda_gate._bin("cuobjdump"), "-symbols", so], capture_output=True, text=True,
                         check=True).stdout
    entries = {ln.split()[-1] for ln in out.splitlines() if "STO_ENTRY" in ln}
    assert entries
    for tool, kernels in (("memcheck", gpu_check.CUDA_KERNELS), ("racecheck", gpu_check.SHARED_MEMORY_KERNELS)):
        _, filters, _ = split(gpu_check.sanitizer_argv(tool, "small", cuda_only=True)[0])
        subs = [f[len("kns="):] for f in filters]
        for s in subs:
            assert any(s in e for e in entries), f"{tool}: {s} matches no kernel of {so}"
        for e in entries:
            hits = [s for s in subs if s in e]
            expected = any(f"{len(k)}{k}" in e for k in kernels)
            assert len(hits) == (1 if expected else 0), (tool, e, hits)


def _constant(name: str) -> int:
    for f in sorted(CSRC.glob("*.cuh")):
        m = re.search(rf"constexpr int {name} = (\d+);", f.read_text())
        if m:
            return int(m.group(1))
    raise AssertionError(f"{name} not found in csrc/")


def _two_tiles(n: int, tile: int) -> bool:
    return n > tile and n % tile != 0


def test_the_tiles_case_has_two_tiles_in_every_tiled_dimension_of_the_cuda_kernels():
    s = gpu_check.SIZES["tiles"]
    T, d_in, d_out = s["T"], s["d_in"], s["d_out"]
    assert _two_tiles(T, _constant("kTileM"))  # prefill tiles of tokens
    assert _two_tiles(d_in, _constant("kTileK"))  # the shrink's steps over the features
    assert _two_tiles(d_in, _constant("kOutTile")) and _two_tiles(d_out, _constant("kOutTile"))  # bwd_dx, expand
    assert _two_tiles(d_out, _constant("kExpandThreads"))  # BGMV expand
    assert T > 4 * _constant("kTopkWarps")  # router_topk: a token a warp
    # decode (csrc/ops.cpp proper_decode_cuda): feature splits, about two CTAs per SM (132 on
    # an H100), at least 256 features each; the expand: 256 outputs a CTA
    t = gpu_check.DECODE_TOKENS["tiles"]
    assert t <= 256 and min(max((2 * 132 + t - 1) // t, 1), max(1, d_in // 256)) >= 2
    assert _two_tiles(d_out, 256)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("strategy", ["dense", "grouped"])
def test_the_tiles_case_has_two_tiles_in_every_tiled_dimension_of_the_triton_kernels(dtype, strategy):
    """The launches an H100 gets (recorded on meta tensors with the sm_90 configurations)."""
    from proper_kernels import launch, triton_linear
    from proper_kernels.plan import build_plan

    s = gpu_check.SIZES["tiles"]
    T, d_in, d_out, E, k, r, r_u, N = (s[n] for n in ("T", "d_in", "d_out", "E", "k", "r", "r_u", "N"))
    meta = dict(device="meta", dtype=getattr(torch, dtype))
    x, base = torch.empty(T, d_in, **meta), torch.empty(T, d_out, **meta)
    A, B = torch.empty(E, r, d_in, **meta), torch.empty(E, d_out, r, **meta)
    wx, ru, wh = torch.empty(E, d_in, **meta), torch.empty(N + 1, E, **meta), torch.empty(E, r_u, **meta)
    ua, ub = torch.empty(N, r_u, d_in, **meta), torch.empty(N, d_out, r_u, **meta)
    needs = {n: True for n in ("lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")}
    with launch.recording("sm90") as launches:
        plan = build_plan(torch.empty(T, dtype=torch.long, device="meta"), torch.Size([T]), torch.device("meta"), N)
        c = triton_linear._Call(x, A, B, k, r_u, strategy)
        y, side = triton_linear.forward(c, x, x, base, plan.table, A, B, 2.0, 1.0, wx, ru, wh, ua, ub, 1.0,
                                        bank_rows=N)
        triton_linear.backward(c, torch.empty_like(y), torch.empty(T, k, device="meta"), None, side, x, x,
                               plan.table, plan.max_runs, A, B, 2.0, 1.0, wx, ru, wh, ua, ub, 1.0, needs, False)
    launches = [ln for ln in launches if hasattr(ln, "kernel")]
    assert launches and {ln.name for ln in launches} <= set(gpu_check.TRITON_KERNELS)
    checked = []
    for ln in launches:
        c = ln.consts
        # features: IN and OUT tiled by BLOCK_K / BLOCK_N / BLOCK_M; a segment GEMM's M and N
        pairs = [("IN", "BLOCK_K"), ("OUT", "BLOCK_N"), ("OUT", "BLOCK_M"), ("M", "BLOCK_M"), ("N", "BLOCK_N")]
        for dim, block in pairs:
            if dim in c and block in c and c[dim] in (d_in, d_out):
                assert _two_tiles(c[dim], c[block]), (ln.name, dim, block, c)
                checked.append((ln.name, dim))
        # tokens: BLOCK_T; BLOCK_P tokens a step (weight gradients), or an expert's (token,
        # slot) pairs a block (grouped), T k / E of them on average
        if "BLOCK_T" in c or "BLOCK_P" in c:
            n = T if "BLOCK_T" in c or ln.name.startswith("_wgrad") else T * k // E
            assert _two_tiles(n, c.get("BLOCK_T", c.get("BLOCK_P"))), (ln.name, c)
            checked.append((ln.name, "T"))
    assert {d for _, d in checked} >= {"IN", "OUT", "T"}, checked


def test_a_check_that_raises_or_gives_nan_fails_with_its_row(tmp_path):
    rows = tmp_path / "rows.jsonl"
    checks = gpu_check.Checks(RowSink(rows, "gpu_check"), "small")
    assert checks.run("fine", torch.float32, lambda: {"y": 1e-6})
    assert not checks.run("nan", torch.bfloat16, lambda: {"y": 1e-3, "x": float("nan")})
    assert not checks.run("raises", torch.float16, lambda: 1 / 0)
    got = read_rows(rows)
    assert [(r["name"], r["dtype"], r["ok"]) for r in got] == [("fine", "fp32", True), ("nan", "bf16", False),
                                                               ("raises", "fp16", False)]
    assert got[0]["worst"] == 1e-6 and got[0]["tol"] == gpu_check.TOL[torch.float32]
    assert "ZeroDivisionError" in got[2]["error"] and not checks.ok
    assert "1/3 checks ok" in checks.summary() and "nan bf16, raises fp16" in checks.summary()


def test_without_a_gpu_it_says_so_in_its_summary(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is there")
    assert gpu_check.main(["--size", "tiles", "--rows", str(tmp_path / "r.jsonl")]) == 2
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("summary: not run")
