"""Triton kernels compiled here, with no GPU, and carried to a lent GPU machine's Triton cache.

A GPU lease is short, and Triton compiles each kernel specialization the first time it is
launched (0.1-0.9 s each; 0.36 s on average for the goal cases, on one core here). This
module compiles the lease's launches here for sm_90, into a Triton cache directory that
travels with the working tree (a carried, git-ignored path), and puts that cache where
Triton's runtime looks on the GPU machine, so that the runtime loads the kernels instead of
compiling them:

    python -m benchmarks.lease_cache prepare DIR [--case NAME ...] [--dtype bfloat16 ...] [--jobs N]
    python -m benchmarks.lease_cache install DIR [--cache-dir CACHE] [--launchers]  # on the GPU
    python -m benchmarks.lease_cache count [CACHE]                                  # kernels in a cache
    python -m benchmarks.lease_cache check DIR [-n 2]                               # on the GPU

How Triton 3.6 finds a kernel: ``triton.compile`` hashes ``triton_key()`` (triton's own
Python files and ``libtriton.so``), the kernel's source and specialization, the ptxas
version and the target arch, the options and any cache-invalidating environment variables
that are set into a directory name under ``TRITON_CACHE_DIR``. In that directory the group
file ``__grp__<kernel>.json`` maps each file of the kernel to its path. The runtime's
``JITFunction.run`` builds the same source and options as ``compile_check._specialise``, so
it asks for the same directory. Three things break a carried cache, and this module fixes
them:

1. The group's paths are absolute. After a copy they name the old place, Triton skips the
   files it cannot find, misses the metadata and compiles again. ``install`` rewrites them.
2. ``libtriton.so`` differs between the wheels of one triton release for two Python versions
   (3.11 here, 3.12 on the GPU machine); every other file of the two wheels is identical.
   So the key differs though the compiler is the same. ``install`` re-keys an entry whose key
   differs only in that hash. It refuses any other difference: another triton release,
   another ptxas, a cache-invalidating variable set on one machine only.
3. The runtime reads only the cubin and the metadata json. ``prepare`` drops the IR files
   (source, ttir, ttgir, llir, ptx), 85% of the bytes: about 52 KB a kernel is left.

Set TRITON_CACHE_DIR on the GPU machine before any process starts: where it is unset,
torch's inductor sets it to its own directory at its first Triton kernel, and the kernels
launched after that in the same process are looked up there.

A kernel is found only if the GPU run specializes it the same way: the same dtypes,
constexprs, warps and stages, the same integer arguments equal to 1 or divisible by 16, and
pointers with the same 16-byte alignment. ``record`` gives the alignment right for tensors
that the host code allocates (a meta tensor's ``data_ptr`` is its offset in bytes; CUDA
allocations start 512-byte aligned). Triton also builds a small C launcher with gcc (about
0.3 s) for each new argument signature at its first launch. It is built against the Python
that runs it, so it is not carried: ``install --launchers`` builds them all on the GPU
machine at once, in parallel.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

MANIFEST = "lease-cache.json"
KEEP = (".cubin", ".json")  # what the runtime reads; the IRs are for debugging only


# -- group files ------------------------------------------------------------------------------

def _groups(entry: Path) -> list[Path]:
    return sorted(entry.glob("__grp__*.json"))


def _write_group(group: Path, children: dict) -> None:
    tmp = group.with_name(group.name + ".tmp")
    tmp.write_text(json.dumps({"child_paths": children}))
    os.replace(tmp, group)


def _relocate(entry: Path, keep_ir: bool = True) -> None:
    """Point every group of a cache entry (one key directory) at the entry's own files, by
    absolute path. Children whose file is missing are dropped; without `keep_ir`, so are
    the IR files, which are deleted."""
    for group in _groups(entry):
        children = json.loads(group.read_text()).get("child_paths", {})
        fixed = {}
        for child in children:
            path = entry / child
            if not keep_ir and not child.endswith(KEEP):
                path.unlink(missing_ok=True)
            elif path.is_file():
                fixed[child] = str(path.resolve())
        _write_group(group, fixed)


def count(cache_dir) -> int:
    """Kernels in a Triton cache directory: group files whose metadata json is there (what the
    runtime counts as a hit)."""
    n = 0
    for group in Path(cache_dir).glob("*/__grp__*.json"):
        try:
            children = json.loads(group.read_text()).get("child_paths", {})
        except (OSError, ValueError):
            continue
        n += any(c.endswith(".json") and os.path.exists(p) for c, p in children.items())
    return n


# -- the key ----------------------------------------------------------------------------------

def _key_dir(key: str) -> str:
    """The directory Triton files a cache key under (triton.runtime.cache: base32 of sha256)."""
    import base64

    return base64.b32encode(hashlib.sha256(key.encode("utf-8")).digest()).decode("utf-8").rstrip("=")


def _libtriton_hash() -> str:
    """sha256 of libtriton.so, as triton_key() reads it."""
    import sysconfig

    import triton

    ext = sysconfig.get_config_var("EXT_SUFFIX").split(".")[-1]
    return hashlib.sha256((Path(triton.__file__).parent / "_C" / f"libtriton.{ext}").read_bytes()).hexdigest()


def rekey_reason(prepared: str, local: str, libtriton: str) -> Optional[str]:
    """Why an entry keyed with triton_key `prepared` may not be re-keyed to `local` (None: it
    may). The two may differ in one part only: the hash of libtriton.so, `libtriton` here."""
    a, b = prepared.split("-"), local.split("-")
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) != len(b) or len(diff) > 1 or (diff and b[diff[0]] != libtriton):
        return "triton's own files differ, not only libtriton.so"
    return None


def _state(arch: int = 90) -> dict:
    """What the key depends on besides the kernel, on this machine."""
    import platform

    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import triton_key

    return dict(triton_version=triton.__version__, python=platform.python_version(), triton_key=triton_key(),
                backend_hash=make_backend(GPUTarget("cuda", arch, 32)).hash(),
                env=dict(sorted(get_cache_invalidating_env_vars().items())))


# -- prepare ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _cache_dir(path: Path):
    """TRITON_CACHE_DIR set to `path` inside the block (for this process and the workers it
    starts), as it was after."""
    was = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if was is None:
            os.environ.pop("TRITON_CACHE_DIR")
        else:
            os.environ["TRITON_CACHE_DIR"] = was


def _compile_one(launch, target: str, prune: bool) -> tuple[str, dict]:
    """Compile one recorded launch into the current Triton cache: (key directory, entry)."""
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_key, triton_key

    from proper_kernels.compile_check import _specialise

    src, options, gpu = _specialise(launch, target)
    start = time.perf_counter()
    kernel = triton.compile(src, target=gpu, options=options.__dict__)
    seconds = time.perf_counter() - start
    # The key triton.compile used, less its triton_key() part, so install() can re-key it.
    backend = make_backend(gpu)
    key = get_cache_key(src, backend, backend.parse_options(dict(options.__dict__)), get_cache_invalidating_env_vars())
    if hashlib.sha256(key.encode("utf-8")).hexdigest() != kernel.hash or not key.startswith(triton_key()):
        raise RuntimeError(f"{launch.name}: could not rebuild triton's cache key")
    entry = Path(kernel.metadata_group[f"{src.name[:150]}.json"]).parent
    _relocate(entry, keep_ir=not prune)
    return entry.name, dict(kernel=launch.name, tail=key[len(triton_key()):], seconds=round(seconds, 3),
                            signature=list(src.signature.values()))


def prepare(out_dir, jobs: list, target: str = "sm90", prune: bool = True, workers: int = 1) -> dict:
    """Compile the recorded launches `jobs` ((source, case, dtype, index): :func:`_launches`)
    for `target` into the Triton cache `out_dir`, in `workers` processes, drop the IR files
    (unless not `prune`), and write the manifest install() reads. Returns the manifest."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(source, case, dtype, target, index, prune) for source, case, dtype, index in jobs]
    entries = {}
    with _cache_dir(out):  # where triton.compile writes, here and in the workers
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                built = list(pool.map(_prepare_job, tasks))
        else:
            built = [_prepare_job(t) for t in tasks]
    for name, entry in built:
        entries.setdefault(name, entry)  # a launch recorded twice: keep the build, not the hit
    return _write_manifest(out, target, entries)


def _write_manifest(out: Path, target: str, entries: dict) -> dict:
    from proper_kernels.compile_check import CAPABILITY

    old = out / MANIFEST
    merged = json.loads(old.read_text())["entries"] if old.exists() else {}
    merged.update(entries)
    manifest = dict(_state(CAPABILITY[target]), target=target, arch=CAPABILITY[target], entries=merged)
    old.write_text(json.dumps(manifest, indent=1))
    return manifest


def _launches(source: str, case: str, dtype: str, target: str) -> list:
    """The recorded launches of a goal case (source "goal": compile_check's cases, which the
    goals phase runs) or of a case of the lease's correctness phase (source "correct")."""
    if source == "correct":
        from benchmarks import gpu_correct

        return gpu_correct.recorded(next(c for c in gpu_correct.CASES if c.name == case), target)
    from proper_kernels.compile_check import record

    return record(case, dtype, target)


def _prepare_job(job: tuple) -> tuple[str, dict]:
    """One recorded launch (a worker process; TRITON_CACHE_DIR is set)."""
    source, case, dtype, target, index, prune = job
    name, entry = _compile_one(_launches(source, case, dtype, target)[index], target, prune)
    entry["launch"] = dict(source=source, case=case, dtype=dtype, index=index)
    return name, entry


# -- install ----------------------------------------------------------------------------------

def install(src_dir, cache_dir=None) -> dict:
    """Copy the carried cache `src_dir` into `cache_dir` (default: where Triton looks here,
    TRITON_CACHE_DIR or Triton's default) with every group pointing at its new files, re-keyed
    to this machine's triton_key() where only libtriton.so's hash differs. Raises ValueError
    if the runtime here would not find the kernels. Returns what it did."""
    import triton

    src = Path(src_dir).resolve()
    dst = Path(cache_dir or triton.knobs.cache.dir).resolve()
    if src == dst:
        raise ValueError("install copies the carried cache elsewhere: give another cache_dir")
    manifest = json.loads((src / MANIFEST).read_text()) if (src / MANIFEST).exists() else None
    local_key = None
    if manifest is not None:
        here = _state(manifest.get("arch", 90))
        if here["triton_version"] != manifest["triton_version"]:
            raise ValueError(f"prepared with triton {manifest['triton_version']}, here {here['triton_version']}")
        for what in ("backend_hash", "env"):
            if here[what] != manifest[what]:
                raise ValueError(f"{what} differs: prepared {manifest[what]!r}, here {here[what]!r}")
        if here["triton_key"] != manifest["triton_key"]:
            why = rekey_reason(manifest["triton_key"], here["triton_key"], _libtriton_hash())
            if why:
                raise ValueError(f"prepared with Python {manifest['python']}, here {here['python']}: {why}")
            local_key = here["triton_key"]
    entries = manifest["entries"] if manifest else {}
    done = 0
    for entry in sorted(p for p in src.iterdir() if p.is_dir()):
        name = entry.name
        if local_key is not None and name in entries:
            name = _key_dir(local_key + entries[name]["tail"])
        target = dst / name
        target.mkdir(parents=True, exist_ok=True)
        for f in entry.iterdir():
            if f.is_file():
                shutil.copyfile(f, target / f.name)
                if local_key is not None and name != entry.name and f.suffix == ".json" \
                        and not f.name.startswith("__grp__"):
                    meta = json.loads(f.read_text())
                    meta["hash"] = hashlib.sha256((local_key + entries[entry.name]["tail"]).encode()).hexdigest()
                    (target / f.name).write_text(json.dumps(meta))
        _relocate(target)
        done += bool(_groups(target))
    return dict(cache_dir=str(dst), kernels=done, rekeyed=local_key is not None)


def _build_launcher(signature) -> Optional[str]:
    """Build the C launcher Triton builds with gcc at the first launch of a kernel with this
    argument signature (CudaLauncher), into the current Triton cache. Returns an error or None."""
    try:
        if signature is None:
            from triton.backends.nvidia.driver import CudaUtils

            CudaUtils()  # the driver's own module, built once per cache
            return None
        from triton.backends.nvidia.driver import include_dirs, libraries, library_dirs, make_launcher
        from triton.runtime.build import compile_module_from_src

        sig = {i: tuple(t) if isinstance(t, list) else t for i, t in enumerate(signature)}
        compile_module_from_src(src=make_launcher({}, sig, []), name="__triton_launcher",
                                library_dirs=library_dirs(), include_dirs=include_dirs, libraries=libraries)
    except Exception as e:  # reported; the runtime builds it at the first launch instead
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def launchers(src_dir, cache_dir=None, jobs: Optional[int] = None) -> list[str]:
    """On the GPU machine (gcc, libcuda.so.1): build the launchers of the prepared kernels into
    `cache_dir`, in parallel, instead of one by one at their first launches (each is a gcc run
    of about 0.3 s, one per distinct argument signature, and needs this machine's Python
    headers, so it cannot be carried). Returns the errors."""
    from concurrent.futures import ProcessPoolExecutor

    import triton

    manifest = json.loads((Path(src_dir) / MANIFEST).read_text())
    sigs = [None] + [json.loads(s) for s in sorted({json.dumps(e["signature"]) for e in manifest["entries"].values()})]
    with _cache_dir(Path(cache_dir or triton.knobs.cache.dir).resolve()):  # the workers'
        with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            return [e for e in pool.map(_build_launcher, sigs) if e]


# -- check (on the GPU machine) ---------------------------------------------------------------

def check(src_dir, n: int = 2) -> list[tuple[str, bool]]:
    """Compile the first `n` prepared goal-case launches afresh with this machine's triton
    (into a temporary cache) and compare each cubin with the carried one: (kernel, same)."""
    import tempfile

    import triton

    from proper_kernels.compile_check import _specialise

    manifest = json.loads((Path(src_dir) / MANIFEST).read_text())
    out = []
    for name, entry in list((k, e) for k, e in manifest["entries"].items() if "launch" in e)[:n]:
        ln = entry["launch"]
        launch = _launches(ln.get("source", "goal"), ln["case"], ln["dtype"], manifest["target"])[ln["index"]]
        src, options, gpu = _specialise(launch, manifest["target"])
        with tempfile.TemporaryDirectory() as tmp, triton.knobs.cache.scope():
            triton.knobs.cache.dir = tmp
            fresh = triton.compile(src, target=gpu, options=options.__dict__).asm["cubin"]
        carried = (Path(src_dir) / name / f"{src.name[:150]}.cubin").read_bytes()
        out.append((entry["kernel"], fresh == carried))
    return out


# -- command line -----------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lease_cache", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="compile the lease's launches into DIR (no GPU needed): the goal "
                        "cases and the correctness phase's cases")
    pp.add_argument("dir", type=Path)
    pp.add_argument("--case", action="append",
                    help="only this compile_check case (repeatable; default: all, and gpu_correct's cases)")
    pp.add_argument("--dtype", action="append", help="default: bfloat16 and float16")
    pp.add_argument("--target", default="sm90", choices=("sm90", "sm80"))
    pp.add_argument("--keep-ir", action="store_true", help="keep the IR files (about 10x the bytes)")
    pp.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    pi = sub.add_parser("install", help="put a carried DIR where Triton's runtime looks")
    pi.add_argument("dir", type=Path)
    pi.add_argument("--cache-dir", default=None, help="default: TRITON_CACHE_DIR or Triton's default")
    pi.add_argument("--launchers", action="store_true", help="also build the kernels' C launchers, in parallel")
    pi.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    pc = sub.add_parser("count", help="kernels in a Triton cache")
    pc.add_argument("dir", nargs="?", default=None, help="default: TRITON_CACHE_DIR or Triton's default")
    pk = sub.add_parser("check", help="recompile a few prepared kernels here and compare the cubins")
    pk.add_argument("dir", type=Path)
    pk.add_argument("-n", type=int, default=2)
    args = p.parse_args(argv)
    if args.cmd in ("prepare", "check") and os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("lease_cache: run it without TRITON_INTERPRET=1 (it compiles for the GPU)", file=sys.stderr)
        return 2
    if args.cmd == "count":
        import triton

        print(count(args.dir or triton.knobs.cache.dir))
        return 0
    if args.cmd == "install":
        try:
            info = install(args.dir, args.cache_dir)
        except ValueError as e:
            print(f"lease_cache install: not installed: {e}", file=sys.stderr)
            return 1
        print(f"lease_cache install: {info['kernels']} kernels into {info['cache_dir']}"
              f"{' (re-keyed for this triton build)' if info['rekeyed'] else ''}")
        if args.launchers:
            start = time.perf_counter()
            errors = launchers(args.dir, info["cache_dir"], args.jobs)
            print(f"lease_cache install: launchers built in {time.perf_counter() - start:.1f} s, {len(errors)} errors"
                  + "".join(f"\n  {e}" for e in sorted(set(errors))))
        return 0
    if args.cmd == "check":
        rows = check(args.dir, args.n)
        for kernel, same in rows:
            print(f"{kernel}: {'same cubin' if same else 'DIFFERENT cubin'}")
        return 0 if rows and all(s for _, s in rows) else 1
    from benchmarks import gpu_correct
    from proper_kernels.compile_check import ROUTER_CASES, record
    from proper_kernels.cost import CASES

    names = args.case or [c.name for c in CASES] + [c[0] for c in ROUTER_CASES]
    dtypes = tuple(args.dtype or ("bfloat16", "float16"))
    jobs = [("goal", c, d, i) for c in names for d in dtypes for i in range(len(record(c, d, args.target)))]
    if not args.case:  # the lease's correctness cases too
        jobs += [("correct", c.name, c.dtype, i) for c in gpu_correct.CASES
                 for i in range(len(gpu_correct.recorded(c, args.target)))]
    out = args.dir.resolve()
    start = time.perf_counter()
    entries = prepare(out, jobs, args.target, not args.keep_ir, max(1, args.jobs))["entries"]
    wall = time.perf_counter() - start
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"lease_cache prepare: {len(jobs)} launches, {len(entries)} kernels, {count(out)} in {out}, "
          f"{size / 2**20:.1f} MiB, {wall:.1f} s wall, {sum(e['seconds'] for e in entries.values()):.1f} s compiling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
