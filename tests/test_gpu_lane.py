"""The GPU lane's spill check looks at every module that holds a Triton kernel (checked on the
CPU: a new strategy file must not fall out of the lane unnoticed)."""

import re
from pathlib import Path

from benchmarks.gpu_lane import triton_modules

ROOT = Path(__file__).resolve().parents[1]


def test_the_spill_check_covers_every_module_with_a_triton_kernel():
    with_kernels = {p.stem for p in (ROOT / "proper_kernels").glob("*.py")
                    if re.search(r"^@triton\.jit", p.read_text(), re.M)}
    assert {"triton_dense", "triton_grouped", "triton_router"} <= with_kernels
    covered = {m.__name__.rpartition(".")[2] for m in triton_modules()}
    assert with_kernels <= covered, with_kernels - covered
