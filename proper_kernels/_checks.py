"""Argument checks shared by every backend: done once at the dispatcher boundary.

Each error names the argument at fault, so a user sees which tensor to fix.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

CHECK_ENV = "PROPER_CHECK_FINITE"


def check_mode() -> bool:
    """True when PROPER_CHECK_FINITE=1: non-finite inputs and router logits raise."""
    return os.environ.get(CHECK_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def tensor(name: str, t, *, ndim: Optional[int] = None, floating: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def shape(name: str, t: Tensor, expected: Sequence[int], meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({meaning}), got {tuple(t.shape)}")


def same_device_dtype(ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def user_ids(ids, x: Tensor, num_users: Optional[int], *, check_range: bool = True) -> Tensor:
    """Per-token ids (shaped like x.shape[:-1]) or per-sequence ids ([x.shape[0]])."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"user_ids must be a torch.Tensor of integers, got {type(ids).__name__}")
    signed_ids(ids)
    if ids.device != x.device:
        raise ValueError(f"user_ids is on {ids.device} but x is on {x.device}")
    lead = x.shape[:-1]
    if ids.shape != lead and not (ids.dim() == 1 and x.dim() >= 2 and ids.shape[0] == x.shape[0]):
        raise ValueError(
            f"user_ids must have one id per token (shape {tuple(lead)}) or one per sequence "
            f"(shape ({x.shape[0] if x.dim() >= 2 else '?'},)), got shape {tuple(ids.shape)}"
        )
    ids = ids.long()
    if check_range and ids.numel() > 0:
        check_id_range(ids, num_users)
    return ids


SIGNED_INTEGERS = (torch.int64, torch.int32, torch.int16, torch.int8)


def signed_ids(ids: Tensor) -> Tensor:
    """`ids` as int64, refusing dtypes that cannot hold -1 (a user without a row)."""
    if ids.dtype not in SIGNED_INTEGERS:
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"user_ids must be an integer tensor, got dtype {ids.dtype}")
        raise TypeError(f"user_ids must be a signed integer tensor (int8, int16, int32 or int64): {ids.dtype} "
                        "cannot hold -1, the id of a user without a row")
    return ids.long()


def check_id_range(ids: Tensor, num_users: Optional[int]) -> None:
    """-1 is a user without a row; any id < -1 or >= num_users is an error naming it."""
    limit = num_users if num_users is not None else 0
    bad = (ids < -1) | (ids >= limit)
    if bool(bad.any()):
        first = int(ids[bad].reshape(-1)[0])
        raise ValueError(
            f"user_ids contains {first}, outside the valid range [-1, {limit}) "
            f"(-1 is a user without a row; the bank has {limit} users)"
        )


def finite(name: str, t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"{name} contains NaN or Inf ({CHECK_ENV}=1 is set)")
