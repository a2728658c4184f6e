"""proper_kernels: the ops behind ProperLinear, one dispatcher per op.

``router_topk`` and ``proper_linear`` take ``backend="auto"|"triton"|"cuda"|"torch"``;
``fused_linear`` is the same op by its contract: a batch plan (``build_plan``, once per
batch) and a layer's ``AdapterWeights``;
``proper_kernels.reference`` is the plain-PyTorch oracle every backend is tested against.

The kernels are the floor everything stands on: this package imports torch, triton and its
own CUDA extension, and never imports ``proper`` (``tests/test_wings.py`` walks the imports
and checks it). Design: docs/DESIGN.md#backends.
"""

from . import reference
from .dispatch import (
    BACKENDS,
    AdapterWeights,
    available_backends,
    cuda_extension_error,
    fused_linear,
    last_backend,
    proper_linear,
    router_topk,
    select_backend,
)
from .plan import BatchPlan, build_plan
from .reference import Routing

__all__ = [
    "BACKENDS",
    "AdapterWeights",
    "BatchPlan",
    "Routing",
    "available_backends",
    "build_plan",
    "cuda_extension_error",
    "fused_linear",
    "last_backend",
    "proper_linear",
    "reference",
    "router_topk",
    "select_backend",
]
