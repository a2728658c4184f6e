"""The SASS and resource gate of the built CUDA extension (no GPU): tensor-core instructions
in every 16-bit prefill kernel, no stack or local memory anywhere. Skipped where the
extension is not built (CI builds it: PROPER_EXPECT_CUDA_EXT=1)."""

import importlib.util
import os

import pytest

from proper_kernels import cuda_gate


def test_kernel_names_are_read_from_mangled_names():
    assert cuda_gate._short("_ZN6proper2pf21prefill_shrink_kernelI6__halfEEvNS_12ShrinkLaunchE") == \
        ("prefill_shrink_kernel", "fp16")
    assert cuda_gate._short("_ZN6proper2pf21prefill_bwd_dx_kernelI13__nv_bfloat16EEvNS_11BwdDxLaunchE") == \
        ("prefill_bwd_dx_kernel", "bf16")
    assert cuda_gate._short("_ZN6proper3dec20decode_expand_kernelIfEEvNS_12DecodeLaunchE") == \
        ("decode_expand_kernel", "fp32")


def test_problems_flag_spills_and_missing_tensor_cores():
    row = dict(kernel="prefill_expand_kernel", dtype="bf16", target="sm_90", stack=0, local=0, hmma=0, hgmma=0)
    assert cuda_gate.problems(row) == ["a prefill kernel with no tensor-core instruction"]
    assert cuda_gate.problems(dict(row, hmma=8)) == []
    assert cuda_gate.problems(dict(row, dtype="fp32")) == []
    assert cuda_gate.problems(dict(row, kernel="decode_router_kernel", stack=8)) == ["stack 8 B, local 0 B"]


@pytest.mark.skipif(importlib.util.find_spec("proper_kernels._C") is None and
                    os.environ.get("PROPER_EXPECT_CUDA_EXT") != "1", reason="proper_kernels._C is not built")
def test_the_built_extension_passes_the_gate():
    rows, failures = cuda_gate.check()
    assert failures == []
    tc = [r for r in rows if cuda_gate.needs_tensor_cores(r)]
    # four prefill kernels x two 16-bit types x two targets, each with HMMA
    assert {(r["kernel"], r["dtype"], r["target"]) for r in tc} == {
        (k, d, t) for k in cuda_gate.TENSOR_CORE_KERNELS for d in ("fp16", "bf16") for t in cuda_gate.TARGETS}
    assert all(r["hmma"] > 0 for r in tc)
    assert all(r["stack"] == 0 and r["local"] == 0 for r in rows)
