"""The GPU lease in one call: phases in order of evidence per device-minute, each under a
time limit taken from a budget, each result kept the moment its phase ends.

    bash benchmarks/run_gpu.sh [--budget SECONDS] [--dry-run] [--phase NAME ...] [--list]

(run_gpu.sh calls ``python -m benchmarks.lease`` with the same arguments.) The CUDA
extension builds in the background from the start, with every core, for the device's own
architecture; the Triton phases run meanwhile, and each CUDA phase waits for the build
within its own limit (skipped, with the build log's tail, if the build failed). Every phase
is a subprocess with a time limit: the smaller of its own and the budget left, less a
reserve for packing. A phase with too little time left is recorded as skipped.

Everything lands in ``$OUT`` (default ``benchmarks/results/lease``) as three files, written
again after every phase and on exit (a SIGTERM included):

- ``status.json``: the device, the driver, the versions, the budget and a list ``phases`` of
  ``{name, state (ok | fail | timeout | skipped), seconds, summary}``;
- ``results.json``: every row any phase measured (each phase appends rows as it goes,
  ``benchmarks/rows.py``), with the header of status.json;
- ``logs.tar.gz``: every phase's log and rows file, and the build log.

``--dry-run`` runs the same phases on the CPU, so the script is tested in CI and not first
met on a GPU: tiny shapes, the Triton kernels under the interpreter, the CUDA kernels on the
SIMT emulator (its build stands in for the extension's), the sanitizer phases skipped.
``--phase NAME`` runs only the named phases (the later leases: ``suite``, ``bench``, ...).
The plan, each phase's expected device seconds on an H100 and their basis, is in
benchmarks/README.md; ``--list`` prints the phases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from benchmarks.rows import read_rows

ROOT = Path(__file__).resolve().parents[1]
RESERVE_S = 12.0  # kept back from every phase's limit for packing the results
MIN_START_S = 5.0  # a phase with less time than this left is skipped
LOG_KEEP = 4 << 20  # bytes of one log kept in logs.tar.gz (head and tail)
PY = sys.executable
STATES = ("ok", "fail", "timeout", "skipped")


@dataclass
class Run:
    """What a phase's command line may depend on."""

    dry_run: bool
    work: Path  # logs and rows, packed at the end
    cores: int

    def rows(self, name: str) -> Path:
        """The rows file of phase `name` (the lease appends ``--rows`` with it to the phase's
        command line)."""
        return self.work / f"{name}.rows.jsonl"


@dataclass(frozen=True)
class Phase:
    """One step of the lease. `argv(run)` is its command line, None when it does not run in
    this mode (`why_not` says why). `limit_s`: its own time limit on the GPU (`dry_limit_s`
    on the CPU)."""

    name: str
    what: str
    argv: Callable[[Run], Optional[list]]
    limit_s: float
    dry_limit_s: float
    needs_build: bool = False
    env: Callable[[Run], dict] = lambda run: {}
    why_not: str = ""
    default: bool = True  # part of a lease without --phase
    refused: tuple = ()  # log texts that mean the tool refused this machine: skipped, not failed
    embeds: bool = False  # the JSON files it writes under work/<name>/ go into results.json whole
    rows: bool = True  # its command takes --rows FILE (rows.py), which the lease appends


def _gpu_only(argv: Callable[[Run], list]) -> Callable[[Run], Optional[list]]:
    """`argv` on a GPU; None (the phase does not run) in a dry run."""
    return lambda run: None if run.dry_run else argv(run)


def _interp(run: Run) -> dict:
    return {"TRITON_INTERPRET": "1"} if run.dry_run else {}


def _sanitizer_bin() -> Optional[str]:
    return shutil.which("compute-sanitizer") or next(
        (str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin/compute-sanitizer",)
         if p.exists()), None)


def _sanitizer(tool: str, size: str):
    """(argv, env) of a compute-sanitizer phase (benchmarks.gpu_check.sanitizer_argv)."""
    def argv(run: Run) -> Optional[list]:
        found = _sanitizer_bin()
        if run.dry_run or found is None:
            return None
        from benchmarks import gpu_check

        return [found] + gpu_check.sanitizer_argv(tool, size, cuda_only=tool == "racecheck")[0][1:]

    def env(run: Run) -> dict:
        from benchmarks import gpu_check

        return gpu_check.sanitizer_argv(tool, size, cuda_only=tool == "racecheck")[1]

    return argv, env


_MEMCHECK_SMALL = _sanitizer("memcheck", "small")
_MEMCHECK_TILES = _sanitizer("memcheck", "tiles")
_RACECHECK = _sanitizer("racecheck", "tiles")
# compute-sanitizer refuses the device on some machines' runtimes (gVisor: "Device not
# supported", then error 999 at the first allocation): that says nothing of our kernels.
SANITIZER_REFUSED = ("Device not supported",)
_NO_SANITIZER = ("compute-sanitizer needs a GPU and the CUDA toolkit's compute-sanitizer (on PATH or in "
                 "$CUDA_HOME/bin); a dry run skips it (the emulator's ASan build covers the CPU side)")


def _correct(backend: str):
    def argv(run: Run) -> list:
        workers = 2 if run.dry_run else (min(12, run.cores) if backend == "triton" else 4)
        return [PY, "-m", "benchmarks.gpu_correct", "--backend", backend, "--workers", str(workers),
                "--case-timeout", "60" if run.dry_run else "120"] + (["--dry-run"] if run.dry_run else [])
    return argv


def _goals(backend: str):
    def argv(run: Run) -> list:
        out = str(run.work / f"goals-{backend}")
        if run.dry_run:
            return [PY, "-m", "benchmarks.goals", "--smoke", "--backend", backend if backend == "triton" else "torch",
                    "--out", out]
        return [PY, "-m", "benchmarks.goals", "--backend", backend, "--out", out]
    return argv


def _lane(run: Run) -> list:
    return [PY, "-m", "benchmarks.gpu_lane"] + (["--dry-run"] if run.dry_run else [])


# Triton kernels compiled before the lease (benchmarks/lease_cache.py prepare, in a venv with
# the image's torch and triton) are carried here; the lease's own Triton cache is LEASE_CACHE.
CARRIED_CACHE = ROOT / "build/lease/triton-cache-sm90"
LEASE_CACHE = ROOT / "build/lease/triton-cache"


def _cache_install(run: Run) -> Optional[list]:
    if run.dry_run or not (CARRIED_CACHE / "lease-cache.json").exists():
        return None
    return [PY, "-m", "benchmarks.lease_cache", "install", str(CARRIED_CACHE), "--cache-dir", str(LEASE_CACHE),
            "--launchers", "--jobs", str(run.cores)]


def _age(cache: Path) -> None:
    """Every file of the cache last read at the epoch, so that a read during the lease shows in
    its access time (a cache hit; relatime updates an access time older than the change)."""
    for f in cache.rglob("*.json"):
        os.utime(f, (0, f.stat().st_mtime))


def cache_report(installed: list) -> dict:
    """The lease's Triton cache: kernels carried, installed (the entry directories `installed`),
    compiled during the lease, and the installed ones the runtime read (hits)."""
    from benchmarks import lease_cache

    def read(entry: Path) -> bool:
        return any(f.stat().st_atime > 1 for f in entry.glob("*.json") if not f.name.startswith("__grp__"))

    total = lease_cache.count(LEASE_CACHE) if LEASE_CACHE.exists() else 0
    return dict(dir=str(LEASE_CACHE.relative_to(ROOT)),
                carried=lease_cache.count(CARRIED_CACHE) if CARRIED_CACHE.exists() else 0,
                installed=len(installed), kernels_now=total, compiled_in_lease=max(0, total - len(installed)),
                hits=sum(read(LEASE_CACHE / e) for e in installed),
                hits_method="installed kernels whose metadata was read during the lease (access times set to "
                            "the epoch at install; 0 on a file system mounted noatime)")


def _suite(run: Run) -> Optional[list]:
    """The test suite without the emulator's cases (they run in CI), over the cores with
    pytest-xdist (the image has it; one process without it), test files kept together."""
    if run.dry_run:
        return None
    import importlib.util

    spread = ["-n", str(min(8, run.cores)), "--dist", "loadfile"] if importlib.util.find_spec("xdist") else []
    return [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not emu", *spread,
            "--junitxml", run.work / "suite" / "junit.xml"]
_bench = _gpu_only(lambda run: [PY, "-m", "proper.apps.bench", "--device", "cuda", "--quick",
                                "--out", run.work / "bench"])
_bench_op = _gpu_only(lambda run: [PY, "-m", "benchmarks.bench_op", "--device", "cuda", "--dtype", "bf16",
                                   "--out", run.work / "bench-op" / "op.json"])
_bench_router = _gpu_only(lambda run: [PY, "-m", "benchmarks.bench_router", "--device", "cuda", "--dtype", "bf16",
                                       "--out", run.work / "bench-router" / "router.json"])


# The lease's phases, in the order they run: correctness first (both backends), then the
# lane, the speed goals, the sanitizer. The limits sum to more than the budget on purpose: a
# phase that finishes early leaves its time to the next.
PHASES = (
    Phase("triton-cache", "the Triton kernels compiled before the lease, put where the runtime finds them, and "
          "their C launchers built", _cache_install, 30, 1, rows=False,
          why_not="no carried cache (build/lease/triton-cache-sm90, from `python -m benchmarks.lease_cache prepare` "
          "with the image's torch and triton), or a dry run (the interpreter compiles nothing)"),
    Phase("correct-triton", "the Triton backend against the float64 reference: 17 curated cases, forward and every "
          "gradient", _correct("triton"), 150, 90, env=_interp),
    Phase("lane", "a training step under sync-debug 'error', the step in a CUDA graph, spills of the loaded kernels",
          _lane, 45, 60, env=_interp),
    Phase("correct-cuda", "the CUDA backend against the float64 reference: the same cases but the grouped strategy",
          _correct("cuda"), 60, 90, needs_build=True),
    Phase("goals-triton", "the speed goals on the Triton backend: layer / nn.Linear, training, decode eager and in "
          "a CUDA graph, per-kernel times", _goals("triton"), 100, 60, env=_interp),
    Phase("goals-cuda", "the speed goals on the CUDA backend", _goals("cuda"), 70, 60, needs_build=True),
    Phase("memcheck-small", "compute-sanitizer memcheck on our kernels, no caching allocator: one partial tile",
          _MEMCHECK_SMALL[0], 75, 1, needs_build=True, env=_MEMCHECK_SMALL[1], why_not=_NO_SANITIZER,
          refused=SANITIZER_REFUSED),
    Phase("memcheck-tiles", "memcheck on a case of at least two tiles in every tiled dimension",
          _MEMCHECK_TILES[0], 75, 1, needs_build=True, env=_MEMCHECK_TILES[1], why_not=_NO_SANITIZER,
          refused=SANITIZER_REFUSED),
    Phase("racecheck", "compute-sanitizer racecheck on the CUDA kernels that use block-shared memory",
          _RACECHECK[0], 60, 1, needs_build=True, env=_RACECHECK[1], why_not=_NO_SANITIZER,
          refused=SANITIZER_REFUSED),
    # Later leases, each sized to one call: --phase NAME.
    Phase("suite", "the whole test suite on the GPU, spread over the cores", _suite, 540, 1, needs_build=True,
          why_not="the suite runs in CI itself", default=False, rows=False),
    Phase("bench", "proper bench --device cuda --quick (op, block, ~1B model)", _bench, 480, 1, needs_build=True,
          why_not="a GPU benchmark", default=False, embeds=True, rows=False),
    Phase("bench-op", "benchmarks.bench_op: the op's goal cases in every mode", _bench_op, 300, 1, needs_build=True,
          why_not="a GPU benchmark", default=False, embeds=True, rows=False),
    Phase("bench-router", "benchmarks.bench_router: router_topk against eager PyTorch", _bench_router, 120, 1,
          why_not="a GPU benchmark", default=False, embeds=True, rows=False),
)
PHASE_NAMES = tuple(p.name for p in PHASES)


# -- the build -------------------------------------------------------------------------------

@dataclass
class Build:
    """The CUDA extension's build, started at once in the background (on the CPU: the SIMT
    emulator's build, the stand-in for the extension in a dry run)."""

    run: Run
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0
    state: Optional[str] = None  # None while running
    summary: str = ""
    seconds: float = 0.0
    log: Path = field(init=False)

    def __post_init__(self):
        self.log = self.run.work / "build.log"

    def start(self) -> None:
        self.started = time.time()
        if self.run.dry_run:
            code = ("import sys; sys.path.insert(0, 'tests'); from _helpers import emulator; emulator.load(); "
                    "print('summary: the SIMT emulator (torch.ops.proper_emu) is built and loads')")
            argv, env = [PY, "-c", code], {}
        else:
            arch = _device_arch()
            argv = [PY, "setup.py", "build_ext", "--build-lib", "build/lease/ext", "--build-temp", "build/lease/tmp"]
            env = {"PROPER_BUILD_CUDA": "1", "MAX_JOBS": str(self.run.cores), "TORCH_CUDA_ARCH_LIST": arch}
        self.proc = _popen(argv, env, self.log)

    def poll(self) -> None:
        """Take the build's result once it has ended (the extension moved into place)."""
        if self.state is not None or self.proc is None or self.proc.poll() is None:
            return
        rc = self.proc.returncode
        self.seconds = time.time() - self.started
        if rc != 0:
            self.state, self.summary = "fail", f"exit status {rc}: " + _tail(self.log, 1)
        elif self.run.dry_run:
            self.state, self.summary = "ok", _summary_of(self.log) or "built"
        else:
            self.state, self.summary = _install_extension()

    def wait(self, limit_s: float) -> Optional[str]:
        """None once the build is in place; else why not (still running past `limit_s`, or failed)."""
        if self.state is None:
            try:
                self.proc.wait(timeout=max(0.0, limit_s))
            except subprocess.TimeoutExpired:
                return f"the build was still running after a wait of {limit_s:.0f} s"
            self.poll()
        if self.state == "ok":
            return None
        return "the build failed: " + self.summary + "\n--- build log, last lines:\n" + _tail(self.log, 25)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _kill(self.proc)
            self.state, self.seconds = "timeout", time.time() - self.started
            self.summary = "still running when the lease ended"


def _device_arch() -> str:
    try:
        import torch

        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    except Exception:
        return "9.0"


def _install_extension() -> tuple[str, str]:
    """Move the built library into proper_kernels/ in one rename, so that no phase imports
    a half-written file."""
    built = sorted((ROOT / "build/lease/ext/proper_kernels").glob("_C*.so"))
    if not built:
        return "fail", "the build wrote no proper_kernels/_C*.so"
    for old in (ROOT / "proper_kernels").glob("_C*.so"):
        old.unlink()
    tmp = ROOT / "proper_kernels" / (built[0].name + ".tmp")
    shutil.copyfile(built[0], tmp)
    os.replace(tmp, ROOT / "proper_kernels" / built[0].name)
    check = subprocess.run([PY, "-c", "import proper_kernels as k; e = k.cuda_extension_error(); print(e or 'loaded')"],
                           cwd=ROOT, capture_output=True, text=True)
    said = (check.stdout.strip().splitlines() or [check.stderr.strip()[-300:]])[-1]
    return ("ok", f"built for sm_{_device_arch().replace('.', '')}, extension {said}") if said == "loaded" else \
        ("fail", f"built, but it does not load: {said}")


# -- running a phase ------------------------------------------------------------------------

def _popen(argv: list, env: dict, log: Path) -> subprocess.Popen:
    full = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **env)
    if env.get("TRITON_INTERPRET") != "1":  # only the phases that ask for the interpreter get it
        full.pop("TRITON_INTERPRET", None)
    with open(log, "wb") as f:  # the child keeps its own copy of the descriptor
        f.write(("$ " + " ".join(str(a) for a in argv) + "\n").encode())
        f.flush()
        return subprocess.Popen([str(a) for a in argv], cwd=ROOT, env=full, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM to the phase's process group, SIGKILL 5 s later."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 64 * 1024))
        text = f.read().decode(errors="replace")
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _summary_of(log: Path) -> str:
    """The phase's `summary:` line, else its last line."""
    lines = _tail(log, 200).splitlines()
    said = [ln[len("summary:"):].strip() for ln in lines if ln.startswith("summary:")]
    if said:
        return said[-1][:400]
    return (lines[-1].strip() if lines else "no output")[:400]


@dataclass
class Lease:
    """The run: its budget, its phases' records, and the three files it writes."""

    run: Run
    out: Path
    budget_s: float
    phases: list
    started: float = field(default_factory=time.time)
    records: list = field(default_factory=list)
    header: dict = field(default_factory=dict)
    build: Optional[Build] = None
    current: Optional[tuple] = None  # (phase name, start time) while a phase runs
    cache: Optional[list] = None  # the installed entries of the lease's Triton cache (on a GPU)

    def left(self) -> float:
        return self.budget_s - (time.time() - self.started)

    def run_phase(self, phase: Phase) -> dict:
        rec = dict(name=phase.name, state="skipped", seconds=0.0, summary="")
        argv = phase.argv(self.run)
        if argv is None:
            rec["summary"] = phase.why_not
            return rec
        t0 = time.time()
        log = self.run.work / f"{phase.name}.log"
        if phase.needs_build:
            avail = self.left() - RESERVE_S - MIN_START_S
            why = self.build.wait(avail) if self.build else "no build was started"
            if why is not None:
                rec["summary"] = why.splitlines()[0][:400]
                log.write_text(why + "\n")
                rec["seconds"] = round(time.time() - t0, 1)
                return rec
        own = phase.dry_limit_s if self.run.dry_run else phase.limit_s
        limit = min(own, self.left() - RESERVE_S)
        if limit < MIN_START_S:
            rec["summary"] = f"the budget was spent ({max(0.0, self.left()):.0f} s left, {RESERVE_S:.0f} s kept back)"
            return rec
        rows = ["--rows", self.run.rows(phase.name)] if phase.rows else []
        proc = _popen(argv + rows, phase.env(self.run), log)
        try:
            rc = proc.wait(timeout=limit)
            rec["state"] = "ok" if rc == 0 else "fail"
            rec["summary"] = _summary_of(log) + ("" if rc == 0 else f" (exit status {rc})")
            said = next((t for t in phase.refused if rc != 0 and t in _tail(log, 400)), None)
            if said is not None:
                rec["state"], rec["summary"] = "skipped", f"the tool refused this machine: {said!r} in its log"
        except subprocess.TimeoutExpired:
            _kill(proc)
            rec["state"] = "timeout"
            why = "its own limit" if limit >= own else "the budget left"
            rec["summary"] = f"stopped after {limit:.0f} s ({why}); last: " + _summary_of(log)[:300]
        finally:
            if proc.poll() is None:
                _kill(proc)
        rec["seconds"] = round(time.time() - t0, 1)
        rec["rows"] = len(read_rows(self.run.rows(phase.name)))
        return rec

    def write(self) -> None:
        """status.json, results.json and logs.tar.gz as things stand now."""
        self.out.mkdir(parents=True, exist_ok=True)
        build = []
        if self.build is not None:
            b = self.build
            b.poll()
            running = b.state is None
            build = [dict(name="build", state="skipped" if running else b.state,
                          seconds=round((time.time() - b.started) if running else b.seconds, 1),
                          summary="still running" if running else b.summary)]
        status = dict(self.header, seconds=round(time.time() - self.started, 1), phases=build + self.records)
        if self.cache is not None:
            try:
                status["triton_cache"] = cache_report(self.cache)
            except Exception as e:  # reported, never fatal
                status["triton_cache"] = dict(error=f"{type(e).__name__}: {e}")
        _atomic_json(self.out / "status.json", status)
        rows = []
        for p in self.phases:
            rows += read_rows(self.run.rows(p.name))
        files = {}  # the JSON results of the phases that write files of their own (benchmarks)
        for p in self.phases:
            if p.embeds:
                for f in sorted((self.run.work / p.name).rglob("*.json")):
                    try:
                        files[str(f.relative_to(self.run.work))] = json.loads(f.read_text())
                    except (OSError, ValueError):
                        continue
        _atomic_json(self.out / "results.json", dict(self.header, rows=rows, **({"files": files} if files else {})))
        tmp = self.out / ".logs.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for f in sorted(self.run.work.rglob("*")):
                if f.is_file():
                    tar.add(_capped(f), arcname=f"logs/{f.relative_to(self.run.work)}")
        os.replace(tmp, self.out / "logs.tar.gz")


def _capped(f: Path) -> Path:
    """`f`, or for a log past LOG_KEEP bytes a copy of its head and tail."""
    if f.stat().st_size <= LOG_KEEP:
        return f
    cut = f.with_name(f.name + ".cut")
    with f.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(LOG_KEEP // 4))
        dst.write(f"\n[... {f.stat().st_size - LOG_KEEP} bytes cut ...]\n".encode())
        src.seek(f.stat().st_size - 3 * LOG_KEEP // 4)
        dst.write(src.read())
    return cut


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def header(run: Run, budget_s: float, phases: list) -> dict:
    """The device, the driver and the versions."""
    versions = dict(python=platform.python_version())
    for mod in ("torch", "triton", "transformers", "peft", "safetensors", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # reported, not fatal
            versions[mod] = f"not importable: {type(e).__name__}"
    device, driver = "cpu (dry run)", None
    try:
        import torch

        versions["cuda"] = str(torch.version.cuda)
        if torch.cuda.is_available() and not run.dry_run:
            p = torch.cuda.get_device_properties(0)
            device = f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory >> 30} GiB"
    except Exception:
        pass
    if shutil.which("nvidia-smi") and not run.dry_run:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        driver = q.stdout.strip() or None
    tools = {t: shutil.which(t) for t in ("nvcc", "ninja", "gcc", "nvidia-smi")}
    tools["compute-sanitizer"] = _sanitizer_bin()
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    versions["proper_commit"] = git.stdout.strip() or "unknown"
    return dict(schema="proper.lease/1", date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                started_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), dry_run=run.dry_run,
                device=device, driver=driver, kernel=platform.release(), cores=run.cores, versions=versions,
                tools=tools, budget_s=budget_s,
                command="bash benchmarks/run_gpu.sh " + " ".join(sys.argv[1:]),
                planned=[p.name for p in phases])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bash benchmarks/run_gpu.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole lease (default 480)")
    p.add_argument("--dry-run", action="store_true", help="the same phases on the CPU, tiny shapes")
    p.add_argument("--phase", action="append", metavar="NAME",
                   help=f"run only this phase (repeatable): {', '.join(PHASE_NAMES)}")
    p.add_argument("--out", type=Path, default=None, help="where the three files go (default $OUT, else "
                   "benchmarks/results/lease)")
    p.add_argument("--list", action="store_true", help="print the phases and exit")
    args = p.parse_args(argv)
    if not args.budget > 0:
        p.error(f"--budget must be a positive number of seconds, got {args.budget}")
    unknown = [n for n in args.phase or () if n not in PHASE_NAMES]
    if unknown:
        p.error(f"--phase: unknown phase {unknown[0]!r}; the phases are {', '.join(PHASE_NAMES)}")
    phases = [ph for ph in PHASES if (ph.name in args.phase if args.phase else ph.default)]
    if args.list:
        for ph in PHASES:
            print(f"{ph.name:15s} limit {ph.limit_s:4.0f} s{'' if ph.default else ' (--phase only)'}: {ph.what}")
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("run_gpu.sh: needs a CUDA GPU (or --dry-run)", file=sys.stderr)
            return 2
    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks/results/lease")
    for name in ("status.json", "results.json", "logs.tar.gz"):  # an earlier lease's files
        (out / name).unlink(missing_ok=True)
    run = Run(args.dry_run, Path(tempfile.mkdtemp(prefix="proper-lease-")), os.cpu_count() or 1)
    lease = Lease(run, out, args.budget, phases)
    if not args.dry_run:  # one Triton cache for every phase, fresh, so that its counts are the lease's
        shutil.rmtree(LEASE_CACHE, ignore_errors=True)
        LEASE_CACHE.mkdir(parents=True)
        os.environ["TRITON_CACHE_DIR"] = str(LEASE_CACHE)
        lease.cache = []

    def stop(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop: a second signal must not cut the packing
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if any(ph.needs_build for ph in phases):  # first of all: the build runs while the rest starts
            lease.build = Build(run)
            lease.build.start()
        lease.header = header(run, args.budget, phases)
        lease.write()
        for ph in phases:
            print(f"== [{time.time() - lease.started:5.0f} s] {ph.name}: {ph.what}", flush=True)
            lease.current = (ph.name, time.time())
            rec = lease.run_phase(ph)
            lease.current = None
            if ph.name == "triton-cache" and rec["state"] == "ok":
                _age(LEASE_CACHE)
                lease.cache = sorted(p.name for p in LEASE_CACHE.iterdir() if p.is_dir())
            lease.records.append(rec)
            print(f"   {rec['state']} in {rec['seconds']} s: {rec['summary']}", flush=True)
            lease.write()
    finally:
        if lease.build is not None:
            lease.build.stop()
        if lease.current is not None:  # stopped by a signal while a phase ran
            name, t0 = lease.current
            lease.records.append(dict(name=name, state="timeout", seconds=round(time.time() - t0, 1),
                                      summary="the lease was stopped while this phase ran; last: " +
                                      _summary_of(run.work / f"{name}.log")[:300]))
        done = {r["name"] for r in lease.records}
        for ph in phases:
            if ph.name not in done:
                lease.records.append(dict(name=ph.name, state="skipped", seconds=0.0,
                                          summary="the lease was stopped before this phase"))
        lease.write()
        shutil.rmtree(run.work, ignore_errors=True)
    states = [r["state"] for r in lease.records]
    print(f"== lease done in {time.time() - lease.started:.0f} s: " +
          ", ".join(f"{states.count(s)} {s}" for s in STATES) + f"; results in {out}")
    return 1 if "fail" in states else 3 if "timeout" in states else 0


if __name__ == "__main__":
    sys.exit(main())
