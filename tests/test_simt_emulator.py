"""The SIMT emulator (csrc/emu/simt.h) catches the bugs it claims to catch, and the CUDA
kernels give the same bits whichever order the emulator runs their threads in.

The kernels with the bugs are in csrc/emu/selftest.cpp. The values of the CUDA kernels
against the float64 reference are tested in tests/test_cuda_backend.py (target `emu`).
"""

import os
import subprocess
import sys

import pytest
import torch

from _helpers import emulator
from _helpers.cases import make_case
from _helpers.kernels import cast
from proper_kernels import cuda_backend

TESTS = os.path.dirname(os.path.abspath(__file__))
LANES = 64  # threads of the self-test kernels


@pytest.fixture(scope="module")
def ops():
    return emulator.emu_target().ops


def selftest_in_a_process(name, env=None):
    """emu_selftest(name) in a fresh Python process (for the faults that end it)."""
    prog = ("import sys; sys.path.insert(0, %r)\n"
            "from _helpers import emulator\n"
            "emulator.load().emu_selftest(%r)\n" % (TESTS, name))
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=900, env=env)


# The orders the threads of each round run in: first to last, last to first, and three
# shuffles (seeds 2, 3, 4; each round and block its own).
SCHEDULES = (0, 1, 2, 3, 4)


def under_schedules(ops, fn, schedules=SCHEDULES):
    """[fn() under each schedule]."""
    try:
        out = []
        for s in schedules:
            ops.emu_set_schedule(s)
            out.append(fn())
        return out
    finally:
        ops.emu_set_schedule(0)


def test_a_missing_barrier_shows_as_schedule_dependence(ops):
    fwd, rev, shuffled = under_schedules(ops, lambda: ops.emu_selftest("race"), (0, 1, 2))
    assert torch.isnan(fwd[:-1]).all()  # first to last: each thread reads a slot not yet written
    assert not torch.isnan(rev[:-1]).any()  # last to first: every slot it reads is written
    assert torch.isnan(shuffled).any() and not torch.isnan(shuffled).all()  # some of each
    for out in under_schedules(ops, lambda: ops.emu_selftest("barrier")):
        assert torch.equal(out, torch.arange(LANES, dtype=torch.float32).roll(-1))


@pytest.mark.parametrize("name,pattern", [
    ("exited_lanes", r"16 lanes at __shfl_xor_sync while 16 lanes have exited"),
    ("divergent", r"met at different collectives"),
    ("barrier_divergence", r"deadlock: threads wait at different barriers"),
    ("exited_at_barrier", r"__syncthreads reached by 32 threads while 32 have exited"),
    ("too_much_smem", r"bytes of dynamic shared memory, more than sm_80's"),
    ("too_many_threads", r"a block of 1056 threads"),
])
def test_broken_kernels_are_errors(ops, name, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        ops.emu_selftest(name)
    assert torch.equal(ops.emu_selftest("barrier"), torch.arange(LANES, dtype=torch.float32).roll(-1))


def test_unwritten_shared_memory_reads_as_nan(ops):
    assert torch.isnan(ops.emu_selftest("smem_unwritten")).all()


@pytest.mark.parametrize("name,code,message", [
    ("smem_overrun", 86,
     "SIMT emulator: shared memory accessed 12 bytes past the launch's 256, block (0,0,0) thread (63,0,0)"),
    ("misaligned", None, "misaligned address"),
    ("register_index", None, "index 4 out of bounds for type 'float [4]'"),
])
def test_faults_a_gpu_would_take_end_the_process(ops, name, code, message):
    """What faults on a GPU (or reads a wrong register) stops the emulated process, with a
    line that says what happened: the guard page after the shared memory, and
    UndefinedBehaviorSanitizer's alignment and bounds checks."""
    p = selftest_in_a_process(name)
    assert p.returncode != 0 and (code is None or p.returncode == code), (p.returncode, p.stderr[-2000:])
    assert message in p.stderr, p.stderr[-2000:]


def test_a_global_memory_overrun_is_caught_by_address_sanitizer(ops):
    p = selftest_in_a_process("global_overrun", emulator.asan_env())
    assert p.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in p.stderr, p.stderr[-3000:]
    assert "global_overrun_kernel" in p.stderr and "0 bytes to the right of 256-byte region" in p.stderr


def test_every_cuda_case_is_clean_under_address_sanitizer(ops):
    """compute-sanitizer's memcheck, for global memory, on the CPU: every emulated case of
    test_cuda_backend.py and test_cuda_edge_inputs.py again, with poisoned bytes around
    every tensor."""
    env = emulator.asan_env()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider",
                        os.path.join(TESTS, "test_cuda_backend.py"), os.path.join(TESTS, "test_cuda_edge_inputs.py"),
                        "-k", "emu"],
                       capture_output=True, text=True, timeout=1800, env=env, cwd=os.path.dirname(TESTS))
    out = p.stdout + p.stderr
    assert "ASan doesn't fully support makecontext" in out, "the cases did not run under AddressSanitizer"
    assert "AddressSanitizer" not in out, out[-4000:]
    assert p.returncode == 0, out[-4000:]
    assert " passed" in p.stdout and " failed" not in p.stdout


@pytest.mark.parametrize("dtype,n", [(torch.float32, 32 * 132 * 256 + 77), (torch.float16, 1000),
                                     (torch.bfloat16, 1000)])
def test_fill_writes_every_element(ops, dtype, n):
    """proper::fill_ (csrc/fill.cu, the toolchain op); in fp32, more elements than one grid
    has threads (32 x 132 blocks of 256), so every thread loops."""
    out = torch.full((n,), float("nan"), dtype=dtype)
    assert ops.fill_(out, 2.5).data_ptr() == out.data_ptr()
    assert torch.equal(out, torch.full_like(out, 2.5))


def test_an_unknown_self_test_is_named(ops):
    with pytest.raises(RuntimeError, match="unknown kernel 'nope'"):
        ops.emu_selftest("nope")


def _run_case(case, dtype, train):
    low = cast(case, dtype, "cpu")
    if train:
        for name in ("x", "lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B"):
            if low.get(name) is not None:
                low[name] = low[name].detach().requires_grad_(True)
    y, routing = cuda_backend.proper_linear(**low)
    outs = [y.detach(), routing.logits.detach(), routing.gates.detach(), routing.indices]
    if train:
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
        grads = torch.autograd.grad((y * g).sum() + routing.gates.float().sum(),
                                    [v for v in low.values() if isinstance(v, torch.Tensor) and v.requires_grad])
        outs += list(grads)
    return outs


@pytest.mark.parametrize("path", ["prefill_fp16", "prefill_bf16", "prefill_fp32", "decode", "bgmv"])
def test_the_cuda_kernels_do_not_depend_on_the_schedule(ops, path, monkeypatch):
    """A race between the threads of a block (a missing barrier, a shared-memory slot read
    before it is written) changes the bits between schedules."""
    monkeypatch.setattr(cuda_backend, "_ops", ops)
    if path == "decode":
        case, dtype, train = make_case(21, 7, 70, 37, 4, 2, 16, 8, 6, ("token", "user", "lora")), torch.float32, False
    else:
        case = make_case(22, 129, 70, 37, 4, 2, 16, 8, 6, ("token", "user", "lora"), cold=False)
        dtype = {"prefill_fp16": torch.float16, "prefill_bf16": torch.bfloat16}.get(path, torch.float32)
        train = True
        if path == "bgmv":
            monkeypatch.setattr(cuda_backend, "PREFILL_MAX_COLUMNS", 0)
    before = ops.emu_launches()
    runs = under_schedules(ops, lambda: _run_case(case, dtype, train))
    assert ops.emu_launches() >= before + len(SCHEDULES)
    first = runs[0]
    assert len(first) > 3
    for a in first:
        assert not (a.is_floating_point() and torch.isnan(a).any())
    for other in runs[1:]:
        assert len(other) == len(first)
        for a, b in zip(first, other):
            assert torch.equal(a, b)
