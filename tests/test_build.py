"""The CUDA extension `proper_kernels._C` (csrc/, built by setup.py).

Without a GPU these tests check that the extension was compiled, linked and
registers its ops; the `gpu` tests run the kernel. Where the extension was not
built (CPU-only torch, no nvcc, PROPER_BUILD_CUDA=0) they skip, unless
PROPER_EXPECT_CUDA_EXT=1 (set by CI) says it must be there: then they fail.
"""

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
EXPECT_EXT = os.environ.get("PROPER_EXPECT_CUDA_EXT") == "1"
NOT_BUILT = (
    "proper_kernels._C is not built (CPU-only torch, no nvcc, or PROPER_BUILD_CUDA=0); "
    "build it with `PROPER_BUILD_CUDA=1 pip install --no-build-isolation -e .`"
)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def ext():
    if importlib.util.find_spec("proper_kernels._C") is None:
        if EXPECT_EXT:
            pytest.fail(f"PROPER_EXPECT_CUDA_EXT=1 but {NOT_BUILT}")
        pytest.skip(NOT_BUILT)
    return importlib.import_module("proper_kernels._C")


def test_extension_registers_its_ops(ext):
    assert hasattr(torch.ops.proper, "cuda_build_info")
    assert hasattr(torch.ops.proper, "fill_")


def test_cuda_build_info_names_cuda_and_torch(ext):
    info = torch.ops.proper.cuda_build_info()
    assert isinstance(info, str)
    assert "cuda" in info
    assert f"cuda {torch.version.cuda.split('.')[0]}." in info
    assert f"torch {torch.__version__.split('+')[0]}" in info


def test_fill_rejects_cpu_tensor_naming_the_argument(ext):
    with pytest.raises(RuntimeError, match=r"argument 'out' must be a CUDA tensor, got cpu"):
        torch.ops.proper.fill_(torch.empty(4), 1.0)


def test_fill_meta_propagates_and_checks(ext):
    out = torch.empty(3, 5, device="meta", dtype=torch.bfloat16)
    assert torch.ops.proper.fill_(out, 2.0).shape == (3, 5)
    with pytest.raises(RuntimeError, match=r"argument 'out' must have dtype"):
        torch.ops.proper.fill_(torch.empty(4, device="meta", dtype=torch.float64), 1.0)
    with pytest.raises(RuntimeError, match=r"argument 'out' must be contiguous"):
        torch.ops.proper.fill_(torch.empty(4, 6, device="meta").t(), 1.0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("numel", [0, 1, 257, 1_000_003])
def test_fill_cuda_matches_torch(ext, dtype, numel):
    out = torch.empty(numel, device="cuda", dtype=dtype)
    result = torch.ops.proper.fill_(out, 1.5)  # 1.5 is exact in every dtype here
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, torch.full_like(out, 1.5), rtol=0, atol=0)


@pytest.mark.gpu
@needs_gpu
def test_fill_cuda_rejects_bad_arguments(ext):
    with pytest.raises(RuntimeError, match=r"argument 'out' must be contiguous"):
        torch.ops.proper.fill_(torch.empty(4, 6, device="cuda").t(), 1.0)
    with pytest.raises(RuntimeError, match=r"argument 'out' must have dtype"):
        torch.ops.proper.fill_(torch.empty(4, device="cuda", dtype=torch.int32), 1.0)


def _has_build_tools():
    # Installed distributions, not find_spec: looking up "pip" makes setuptools' distutils
    # hook stand down for the rest of the process, and a later `import setuptools` (the
    # emulator's build, tests/_helpers/emulator.py) then fails.
    import importlib.metadata

    def installed(name):
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            return False

    return all(installed(m) for m in ("pip", "setuptools", "wheel"))


@pytest.mark.skipif(not _has_build_tools(), reason="needs pip, setuptools and wheel")
def test_wheel_without_cuda_is_pure_python(tmp_path):
    """PROPER_BUILD_CUDA=0 builds a pure-Python wheel without importing torch."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in ("proper", "proper_kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    env = dict(os.environ, PROPER_BUILD_CUDA="0", PIP_NO_INPUT="1")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)],
        env=env, check=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "proper/__init__.py" in names and "proper_kernels/__init__.py" in names
    assert not [n for n in names if n.endswith(".so")]


def test_setup_rejects_unknown_build_mode():
    result = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, PROPER_BUILD_CUDA="yes"), timeout=120,
    )
    assert result.returncode != 0
    assert "PROPER_BUILD_CUDA must be 0, 1 or auto, got 'yes'" in result.stderr
