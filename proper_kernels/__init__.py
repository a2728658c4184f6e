"""proper_kernels: the ops behind ProperLinear, one dispatcher per op.

``router_topk`` and ``proper_linear`` take ``backend="auto"|"triton"|"cuda"|"torch"``;
``proper_kernels.reference`` is the plain-PyTorch oracle every backend is tested against.
"""

from . import reference
from .dispatch import (
    BACKENDS,
    available_backends,
    cuda_extension_error,
    last_backend,
    proper_linear,
    router_topk,
    select_backend,
)
from .reference import Routing

__all__ = [
    "BACKENDS",
    "Routing",
    "available_backends",
    "cuda_extension_error",
    "last_backend",
    "proper_linear",
    "reference",
    "router_topk",
    "select_backend",
]
