"""One public function per op, each with a ``backend=`` argument.

``backend="auto"`` picks the fastest backend available for the tensors' device, the call's
phase (decode, prefill, training) and its number of tokens, by the table of
``proper_kernels.auto_table``; the choice is inspectable with :func:`select_backend`
(``explain=True`` gives the reason) before a call and :func:`last_backend` after one, and
logged at DEBUG level. Asking for a backend that is not available raises an error
that says why, never a silent fallback.

Design: docs/DESIGN.md#backends (the backends and their shared op contract).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, auto_table, cuda_backend, launch, reference
from .plan import BatchPlan, check_plan
from .reference import Routing

log = logging.getLogger("proper_kernels")

BACKENDS = ("auto", "triton", "cuda", "torch")


@dataclass(frozen=True)
class Backend:
    """An implementation of every op. ``available(device, dtype)`` returns None or why not."""

    name: str
    available: Callable[[torch.device, Optional[torch.dtype]], Optional[str]]
    router_topk: Optional[Callable] = None
    proper_linear: Optional[Callable] = None


def _torch_available(device: torch.device, dtype: Optional[torch.dtype]) -> Optional[str]:
    return None


def _triton_available(device: torch.device, dtype: Optional[torch.dtype]) -> Optional[str]:
    if _TRITON_ERROR is not None:
        return _TRITON_ERROR
    if dtype == torch.float64:
        return "the Triton kernels compute in float32; float64 runs on backend='torch'"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if launch.interpreting():
            return _installed_interpreter_problem()
        return "Triton needs a CUDA device; on the CPU it runs only under the interpreter (TRITON_INTERPRET=1)"
    return f"Triton does not run on {device.type} tensors"


def _version(v: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '3.6.0' or '2.4.0rc1'."""
    parts = re.findall(r"\d+", v)[:2]
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def interpreter_problem(triton_version: Optional[str] = None, numpy_version: Optional[str] = None) -> Optional[str]:
    """None, or why the Triton interpreter cannot run our kernels with these versions.

    triton 3.6's interpreter turns a program id into a Python int with ``int()`` on a
    one-element array, which NumPy 2.4 refuses (TypeError: only 0-dimensional arrays can be
    converted to Python scalars), so every kernel whose loop bounds depend on a program id
    fails. triton 3.7 squeezes the array first."""
    if triton_version is None:
        if importlib.util.find_spec("triton") is None:
            return None  # the backend says "triton is not installed"
        import triton

        triton_version = triton.__version__
    if numpy_version is None:
        import numpy

        numpy_version = numpy.__version__
    if _version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 4):
        return (f"the interpreter of triton {triton_version} fails with numpy {numpy_version} (it converts "
                "one-element arrays with int()); use triton >= 3.7, or numpy < 2.4 with this triton")
    return None


@functools.lru_cache(maxsize=1)
def _installed_interpreter_problem() -> Optional[str]:
    return interpreter_problem()


def _cuda_available(device: torch.device, dtype: Optional[torch.dtype]) -> Optional[str]:
    if _CUDA_ERROR is not None:
        return _CUDA_ERROR
    if device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors, got {device.type} tensors"
    if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        return f"the CUDA kernels take float32, float16 or bfloat16, got {dtype}; float64 runs on backend='torch'"
    return None


# The Triton kernels load with proper_kernels (importing triton after torch costs little), so
# that torch.compile never meets an import inside a traced call.
_TRITON_ERROR: Optional[str] = None
_triton_ops: dict[str, Callable] = {}
if importlib.util.find_spec("triton") is None:
    _TRITON_ERROR = "triton is not installed"
else:
    try:
        from . import triton_linear, triton_router

        _triton_ops["proper_linear"] = triton_linear.proper_linear
        _triton_ops["router_topk"] = triton_router.router_topk
    except Exception as e:  # a broken triton install must not break the torch backend
        _TRITON_ERROR = f"the Triton kernels failed to load: {type(e).__name__}: {e}"

_CUDA_ERROR: Optional[str] = cuda_backend.load()


def cuda_extension_error() -> Optional[str]:
    """None when the compiled CUDA extension is loaded, else why it is not."""
    return _CUDA_ERROR


_REGISTRY: dict[str, Backend] = {
    "torch": Backend(
        "torch", _torch_available, router_topk=reference.router_topk, proper_linear=reference.proper_linear
    ),
    "triton": Backend(
        "triton",
        _triton_available,
        router_topk=_triton_ops.get("router_topk"),
        proper_linear=_triton_ops.get("proper_linear"),
    ),
    "cuda": Backend(
        "cuda", _cuda_available, router_topk=cuda_backend.router_topk, proper_linear=cuda_backend.proper_linear
    ),
}

# The order of available_backends, and the fallback of "auto" on a GPU when no row of the
# auto table (proper_kernels.auto_table) names an available backend. On the CPU "auto" is
# the torch backend: the Triton interpreter is for testing, not for speed.
_AUTO_ORDER = ("cuda", "triton", "torch")

_last: dict[str, str] = {}


def available_backends(device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> list[str]:
    """Names of the backends that can run on `device` (and `dtype`), fastest first."""
    device = torch.device(device)
    return [n for n in _AUTO_ORDER if _REGISTRY[n].available(device, dtype) is None]


def select_backend(
    backend: str,
    device: Union[str, torch.device],
    dtype: Optional[torch.dtype] = None,
    *,
    phase: str = "prefill",
    tokens: Optional[int] = None,
    explain: bool = False,
):
    """The backend a call with ``backend=`` on tensors of `device`/`dtype` will use, or an error.

    On a GPU, ``"auto"`` follows ``proper_kernels.auto_table`` for the call's `phase`
    ("decode", "prefill", "train" or "router") and number of `tokens`: the measured table of
    this GPU when ``proper bench --device cuda`` wrote one, else the default table. With
    ``explain=True`` it returns ``(backend, reason)``, the reason in words."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend != "auto":
        why = _REGISTRY[backend].available(device, dtype)
        if why is not None:
            raise RuntimeError(f"backend={backend!r} cannot run on {device}" + (f" {dtype}" if dtype else "") +
                               f": {why}")
        return (backend, "asked for by name") if explain else backend
    if device.type != "cuda":
        name, reason = "torch", f"auto on {device.type}: the torch reference (the Triton interpreter is for tests)"
    else:
        name = reason = None
        skipped = []
        for row in auto_table.lookup(device, phase, tokens):
            why = _REGISTRY[row.backend].available(device, dtype)
            if why is None:
                name, reason = row.backend, row.reason
                break
            skipped.append(f"{row.backend} ({why})")
        if name is None:
            name = available_backends(device, dtype)[0]
            reason = "the first available backend"
        if skipped:
            reason += "; passed over: " + ", ".join(skipped)
        reason = f"auto, {phase}" + (f" at {tokens} tokens" if tokens is not None else "") + f": {reason}"
    return (name, reason) if explain else name


def last_backend(op: str = "proper_linear") -> Optional[str]:
    """The backend that ran the most recent call of `op` in this process (None before any)."""
    return _last.get(op)


def _record(op: str, name: str) -> None:
    _last[op] = name
    if not torch.compiler.is_compiling():  # a log call would break a torch.compile graph
        log.debug("proper_kernels.%s ran on backend %s", op, name)


def router_topk(logits: Tensor, top_k: int, temperature: float = 1.0, *, backend: str = "auto"):
    """softmax(logits / temperature) -> top k -> renormalised (gates [T, k], indices [T, k]).

    Ties go to the lower expert index. A NaN in a row gives NaN gates with valid indices;
    with PROPER_CHECK_FINITE=1 it raises instead.
    """
    _checks.tensor("logits", logits, ndim=2)
    _check_topk(top_k, logits.shape[1], temperature)
    if _checks.check_mode():
        _checks.finite("logits", logits)
    name = select_backend(backend, logits.device, logits.dtype, phase="router", tokens=logits.shape[0])
    out = _REGISTRY[name].router_topk(logits, top_k, temperature)
    _record("router_topk", name)
    return out


def _check_topk(top_k: int, num_experts: int, temperature: float) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, {num_experts}] (the number of experts), got {top_k!r}")
    if not _real(temperature) or not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def _real(v) -> bool:
    """A Python or NumPy real number; not a bool, not a string, not a tensor."""
    import numbers

    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_scale(name: str, v) -> float:
    if not _real(v) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite real number, got {v!r}")
    return float(v)


def proper_linear(
    x: Tensor,
    base_out: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    *,
    top_k: int,
    temperature: float = 1.0,
    router_x: Optional[Tensor] = None,
    router_user: Optional[Tensor] = None,
    router_h: Optional[Tensor] = None,
    user_ids: Optional[Tensor] = None,
    user_A: Optional[Tensor] = None,
    user_B: Optional[Tensor] = None,
    user_scaling: float = 0.0,
    dropout: float = 0.0,
    training: bool = False,
    return_routing: bool = False,
    check_user_ids: bool = True,
    backend: str = "auto",
    inplace: bool = False,
    sparse_user_grad: bool = False,
    plan=None,
) -> Union[Tensor, tuple[Tensor, Routing]]:
    """The fused ProperLinear pass added onto the base product (the math: proper_kernels/reference.py).

    x [..., in] and base_out [..., out] (the frozen layer's output for x). user_ids: None
    (every token is a user without a row), one id per token (x.shape[:-1]) or one per
    sequence ([x.shape[0]]); -1 is a user without a row. Dropout (rate `dropout`, when
    `training`) applies to the adapter input, not to the token router.

    Returns y shaped like base_out, or (y, Routing) with ``return_routing=True``.
    ``check_user_ids=False`` skips the id range check (one host sync) for callers that
    validated the ids already, as ``proper.user_context`` does. ``inplace=True`` lets the
    backend add the adapters into base_out's memory (vLLM's ``add_inputs``) instead of a
    fresh tensor, saving a full pass over [T, out]: y may then alias base_out, whose content
    is undefined afterwards. Autograd is unaffected (base_out's producer must not need its
    own output for backward, which holds for a linear layer). ``sparse_user_grad=True`` gives
    user_A, user_B and router_user sparse gradients over the rows in the batch (for a bank of
    millions of users; pair it with ``proper.optim.LazyAdamW``). ``plan``: the batch's
    ``proper_kernels.plan.BatchPlan`` (or a function returning it), which the Triton backend
    reads instead of building one from user_ids; ``proper.user_context`` builds it once per
    batch for every layer.
    """
    _checks.tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the features), got a scalar")
    _checks.tensor("lora_A", lora_A, ndim=3)
    _checks.tensor("lora_B", lora_B, ndim=3)
    E, r, d_in = lora_A.shape
    if E < 1:
        raise ValueError("lora_A must hold at least one expert, got shape " + str(tuple(lora_A.shape)))
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features but lora_A expects {d_in} (lora_A is [E, r, in])")
    _checks.tensor("base_out", base_out)
    d_out = base_out.shape[-1] if base_out.dim() else -1
    _checks.shape("base_out", base_out, tuple(x.shape[:-1]) + (d_out,), "x's leading dims, out")
    _checks.shape("lora_B", lora_B, (E, d_out, r), "E, out, r")
    _checks.same_device_dtype("x", x, lora_A=lora_A, lora_B=lora_B, base_out=base_out)
    _check_topk(top_k, E, temperature)
    if router_x is not None:
        _checks.tensor("router_x", router_x)
        _checks.shape("router_x", router_x, (E, d_in), "E, in")
    if user_A is not None or user_B is not None:
        if user_A is None or user_B is None:
            raise ValueError("user_A and user_B must be given together")
        _checks.tensor("user_A", user_A, ndim=3)
        n_users, r_u = user_A.shape[0], user_A.shape[1]
        _checks.shape("user_A", user_A, (n_users, r_u, d_in), "num_users, r_u, in")
        _checks.shape("user_B", user_B, (n_users, d_out, r_u), "num_users, out, r_u")
    else:
        n_users, r_u = None, 0
    if router_user is not None:
        _checks.tensor("router_user", router_user, ndim=2)
        if router_user.shape[1] != E:
            raise ValueError(f"router_user must have {E} columns (one per expert), got {tuple(router_user.shape)}")
        if n_users is not None and router_user.shape[0] != n_users + 1:
            _checks.shape("router_user", router_user, (n_users + 1, E), "num_users + 1, E")
        if n_users is None:
            n_users = router_user.shape[0] - 1
    if router_h is not None:
        _checks.tensor("router_h", router_h)
        if user_A is None:
            raise ValueError("router_h (the LoRA-aware router) needs the user bank user_A/user_B")
        _checks.shape("router_h", router_h, (E, r_u), "E, r_u")
    _checks.same_device_dtype(
        "x", x, router_x=router_x, router_user=router_user, router_h=router_h, user_A=user_A, user_B=user_B
    )
    if user_ids is not None:
        user_ids = _checks.user_ids(user_ids, x, n_users, check_range=check_user_ids)
    if not _real(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    scaling = _check_scale("scaling", scaling)
    user_scaling = _check_scale("user_scaling", user_scaling)

    checking = _checks.check_mode()
    if checking:
        _checks.finite("x", x)
    tokens = x.numel() // d_in if d_in else 0
    tensors = (x, base_out, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        phase = "train"
    else:
        phase = "decode" if tokens <= auto_table.DECODE_TOKENS else "prefill"
    name = select_backend(backend, x.device, x.dtype, phase=phase, tokens=tokens)
    if sparse_user_grad and name == "cuda":
        if backend != "auto":
            raise ValueError("sparse_user_grad=True needs backend='triton' or 'torch' (sparse bank gradients), "
                             "got 'cuda'")
        name = "triton" if _REGISTRY["triton"].available(x.device, x.dtype) is None else "torch"
    extra = {"plan": plan} if name in ("triton", "cuda") else {}
    x_lora = F.dropout(x, dropout, training=True) if (training and dropout > 0) else x
    y, routing = _REGISTRY[name].proper_linear(
        x,
        base_out,
        lora_A,
        lora_B,
        float(scaling),
        top_k=top_k,
        temperature=float(temperature),
        router_x=router_x,
        router_user=router_user,
        router_h=router_h,
        user_ids=user_ids,
        user_A=user_A,
        user_B=user_B,
        user_scaling=float(user_scaling),
        x_lora=x_lora,
        inplace=inplace,
        sparse_grad=sparse_user_grad,
        **extra,
    )
    _record("proper_linear", name)
    if checking:
        _checks.finite("router logits", routing.logits)
    return (y, routing) if return_routing else y


class AdapterWeights(NamedTuple):
    """One layer's adapter tensors: the weights half of the fused op's contract (the batch's
    plan is the other half). Shapes as in :func:`proper_linear`."""

    lora_A: Tensor
    lora_B: Tensor
    router_x: Optional[Tensor] = None
    router_user: Optional[Tensor] = None
    router_h: Optional[Tensor] = None
    user_A: Optional[Tensor] = None
    user_B: Optional[Tensor] = None


def fused_linear(
    x: Tensor,
    base_out: Tensor,
    weights: AdapterWeights,
    plan: BatchPlan,
    *,
    scaling: float,
    top_k: int,
    temperature: float = 1.0,
    user_scaling: float = 0.0,
    dropout: float = 0.0,
    training: bool = False,
    return_routing: bool = False,
    backend: str = "auto",
    inplace: bool = False,
    sparse_user_grad: bool = False,
) -> Union[Tensor, tuple[Tensor, Routing]]:
    """The fused op by its contract: the batch (a ``BatchPlan`` from
    ``proper_kernels.build_plan``, built once per batch and shared by every layer) and the
    layer (its ``AdapterWeights`` and scalars). Same result as :func:`proper_linear` given
    the plan's user ids."""
    if not isinstance(weights, AdapterWeights):
        raise TypeError(f"weights must be a proper_kernels.AdapterWeights, got {type(weights).__name__}")
    check_plan(plan, x)
    lead = x.shape[:-1]
    uid = plan.user_ids
    # One id per sequence when the plan was built that way (the torch backend then gathers a
    # user's rows once per sequence), else one per token.
    user_ids = uid.reshape(plan.groups, -1)[:, 0] if plan.groups else uid.reshape(lead)
    return proper_linear(
        x, base_out, weights.lora_A, weights.lora_B, scaling, top_k=top_k, temperature=temperature,
        router_x=weights.router_x, router_user=weights.router_user, router_h=weights.router_h, user_ids=user_ids,
        user_A=weights.user_A, user_B=weights.user_B, user_scaling=user_scaling, dropout=dropout, training=training,
        return_routing=return_routing, check_user_ids=False, backend=backend, inplace=inplace,
        sparse_user_grad=sparse_user_grad, plan=plan,
    )
