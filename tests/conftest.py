"""Fixtures of the test suite. The helpers they use live in tests/_helpers (test modules
import them from there, never from here).
"""

import pytest
import torch

from _helpers import emulator
from _helpers.models import ALL_MODELS, ModelSpec


@pytest.fixture(scope="session", autouse=True)
def triton_interpreter_works():
    """Under TRITON_INTERPRET=1 with a triton whose interpreter cannot run our kernels, stop
    with the reason in one line instead of hundreds of failures of the same cause."""
    from proper_kernels.dispatch import interpreter_problem
    from proper_kernels.launch import interpreting

    if interpreting():
        why = interpreter_problem()
        if why is not None:
            pytest.exit(f"TRITON_INTERPRET=1: {why}", returncode=4)


@pytest.fixture(params=ALL_MODELS, ids=lambda s: s.name)
def spec(request) -> ModelSpec:
    return request.param


@pytest.fixture(scope="module", params=["emu", pytest.param("gpu", marks=pytest.mark.gpu)])
def cuda_target(request) -> emulator.Target:
    """The CUDA backend's two targets: the CPU SIMT emulator, and a GPU where there is one."""
    return emulator.emu_target() if request.param == "emu" else emulator.gpu_target()


@pytest.fixture
def on_cuda_target(cuda_target, monkeypatch, request):
    """proper_kernels.cuda_backend calls the target's ops, and every fresh allocation of the
    test is NaN (ints: their maximum): deterministic algorithms with
    torch.utils.deterministic.fill_uninitialized_memory, which covers the ops' at::empty too.
    On the emulator the test must launch a kernel, unless it is marked `no_launch`."""
    from proper_kernels import cuda_backend

    monkeypatch.setattr(cuda_backend, "_ops", cuda_target.ops)
    was = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)  # index_add_ has no deterministic CUDA kernel
    torch.utils.deterministic.fill_uninitialized_memory = True
    counted = cuda_target.name == "emu" and request.node.get_closest_marker("no_launch") is None
    before = cuda_target.ops.emu_launches() if counted else None
    yield cuda_target
    torch.use_deterministic_algorithms(was[0])
    torch.utils.deterministic.fill_uninitialized_memory = was[1]
    if before is not None:
        assert cuda_target.ops.emu_launches() > before, "the test ran no kernel on the emulator"
