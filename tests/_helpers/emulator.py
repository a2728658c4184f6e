"""The CUDA backend's kernels on the CPU: csrc/ compiled with -DPROPER_EMU against the SIMT
emulator (csrc/emu/simt.h) into a library that registers torch.ops.proper_emu, the same
ops as torch.ops.proper for CPU tensors (docs/DESIGN.md#emulator).

It needs a host C++ compiler, ninja and the CUDA headers (cuda_fp16.h, cuda_bf16.h,
cuda_runtime.h from $CUDA_HOME/include, /usr/local/cuda/include or the nvidia-cuda-runtime
wheel). `load()` builds it once per process (ninja keeps the objects under build/emu, and
rebuilds what a changed source or header touches) and returns the ops, or raises
EmulatorUnavailable with the reason.
"""

from __future__ import annotations

import glob
import os
import pathlib
from dataclasses import dataclass

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
NAME = "proper_emu"
SOURCES = [CSRC / "ops.cpp"] + [CSRC / "emu" / f for f in ("kernels.cpp", "fill.cpp", "selftest.cpp")]
# UndefinedBehaviorSanitizer, fatal: a misaligned access (a 16-byte vector load from an
# address a GPU would fault on) and an index past a fixed-size array (a kernel's per-thread
# registers) stop the process with the source line.
SANITIZE = ["-fsanitize=alignment,bounds", "-fno-sanitize-recover=all"]

_ops = None
_error = None  # a failed build, raised again: in the same process, torch's JIT versioner
# would take the next load() for up to date and load the library of an earlier build


class EmulatorUnavailable(RuntimeError):
    pass


def cuda_include() -> str:
    """A directory that holds cuda_fp16.h, cuda_bf16.h and cuda_runtime.h."""
    candidates = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append("/usr/local/cuda/include")
    import site

    for sp in site.getsitepackages():
        candidates += glob.glob(os.path.join(glob.escape(sp), "nvidia", "cu*", "include"))
        candidates += glob.glob(os.path.join(glob.escape(sp), "nvidia", "cuda_runtime", "include"))
    for c in candidates:
        if all(os.path.exists(os.path.join(c, h)) for h in ("cuda_fp16.h", "cuda_bf16.h", "cuda_runtime.h")):
            return c
    raise EmulatorUnavailable("no CUDA headers (cuda_fp16.h, cuda_bf16.h, cuda_runtime.h) in " + ", ".join(candidates))


# AddressSanitizer too: every tensor then has poisoned bytes around it, so a kernel's read or
# write past a tensor stops the process with the kernel's source line (compute-sanitizer's
# memcheck, for global memory). The library must run in a process that starts with libasan
# (`asan_env()`), so it is a separate build that only a subprocess loads.
ADDRESS = ["-fsanitize=address", "-fno-omit-frame-pointer"]


def asan_env(env=None):
    """The environment of a process that may load(address=True)."""
    import subprocess

    lib = subprocess.run(["c++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not lib or not os.path.isabs(lib) or not os.path.exists(lib):
        raise EmulatorUnavailable("the C++ compiler has no libasan.so")
    # libstdc++ is preloaded too, so that ASan finds the C++ runtime's __cxa_throw (the python
    # binary does not link it)
    cxx = subprocess.run(["c++", "-print-file-name=libstdc++.so"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ if env is None else env)
    env["LD_PRELOAD"] = f"{lib} {cxx}" if os.path.isabs(cxx) else lib
    env["PROPER_EMU_ADDRESS"] = "1"
    # no leak report at exit (Python's and torch's allocations), and no alarm at the fibers'
    # stack switches; a first error ends the process
    env["ASAN_OPTIONS"] = "detect_leaks=0:detect_stack_use_after_return=0:halt_on_error=1"
    return env


def load(address=None):
    """torch.ops.proper_emu, built if needed; with AddressSanitizer when `address` (by default
    when PROPER_EMU_ADDRESS=1, which asan_env() sets)."""
    global _ops, _error
    if _ops is not None:
        return _ops
    if _error is not None:
        raise _error
    if address is None:
        address = os.environ.get("PROPER_EMU_ADDRESS") == "1"
    from torch.utils import cpp_extension

    include = cuda_include()
    build = ROOT / "build" / ("emu-asan" if address else "emu")
    build.mkdir(parents=True, exist_ok=True)
    sanitize = SANITIZE + (ADDRESS if address else [])
    try:
        cpp_extension.load(
            name=NAME + ("_asan" if address else ""),
            sources=[str(f) for f in SOURCES],
            extra_cflags=["-DPROPER_EMU", "-O2", "-fno-strict-aliasing", *sanitize, f"-I{include}", f"-I{CSRC}"],
            extra_ldflags=sanitize,
            build_directory=str(build),
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError) as e:
        _error = EmulatorUnavailable(f"the emulated CUDA ops failed to build: {e}")
        raise _error from e
    _ops = getattr(torch.ops, NAME)
    return _ops


@dataclass(frozen=True)
class Target:
    """Where the CUDA backend's tests run: `gpu` (the built extension on a CUDA device) or
    `emu` (the emulated ops on CPU tensors)."""
    name: str
    device: str
    ops: object


def gpu_target() -> Target:
    import proper_kernels

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if proper_kernels.cuda_extension_error() is not None:
        pytest.skip(proper_kernels.cuda_extension_error())
    return Target("gpu", "cuda", torch.ops.proper)


def emu_target() -> Target:
    """The emulated ops; skipped where they cannot be built, except where
    PROPER_EXPECT_CUDA_EXT=1 (CI), where that fails."""
    try:
        return Target("emu", "cpu", load())
    except EmulatorUnavailable as e:
        if os.environ.get("PROPER_EXPECT_CUDA_EXT") == "1":
            raise
        pytest.skip(str(e))
