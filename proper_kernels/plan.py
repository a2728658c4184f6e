"""The per-batch plan: who each token belongs to, and the tokens grouped by user.

Every ProperLinear of a model sees the same tokens and the same users in one forward, so
the metadata the kernels need is built once per forward (``proper.user_context`` caches it
for the model's layers) and shared by every layer and by the backward. It is the batch's
half of the fused op's contract; the weights are the other half.

A plan is one int64 tensor [6, T] (so it travels through ``torch.library`` ops as one
argument), with rows:

  0 uid        the user of each token, -1 for a user without a row
  1 order      the tokens sorted by user (stable: a sequence stays in order)
  2 run        for each sorted position, the index of its run (the users' runs in
               sorted order: run 0 is the lowest user id present)
  3 run_user   the user of run r (entries past the last run: -1)
  4 run_start  the first sorted position of run r (past the last run: T)
  5 run_end    one past its last sorted position (past the last run: T)

After the sort each user present has exactly one run, so a block of sorted tokens holds a
few runs, and a kernel does one tensor-core GEMM per run against that user's rows (the
SGMV idea) instead of a per-token gather of the bank. Everything is built on the device
with fixed-size tensor ops: no host sync, whatever the ids.

Design: docs/DESIGN.md#plan (the per-batch plan).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

UID, ORDER, RUN, RUN_USER, RUN_START, RUN_END = range(6)


class BatchPlan(NamedTuple):
    """A built plan: ``table`` [6, T] int64 (rows as in the module docstring), ``groups``
    (the number of sequences when ids were given per sequence, else 0) and ``max_runs``
    (an upper bound on the runs, known without looking at the ids)."""

    table: Tensor
    groups: int
    max_runs: int

    @property
    def num_tokens(self) -> int:
        return self.table.shape[1]

    @property
    def user_ids(self) -> Tensor:
        """One id per token [T] (-1: no row)."""
        return self.table[UID]


def check_plan(plan, x: Tensor) -> BatchPlan:
    """`plan`, if it is a BatchPlan for the tokens of x (x [..., in]) on x's device."""
    if not isinstance(plan, BatchPlan):
        raise TypeError(f"plan must be a proper_kernels.BatchPlan (proper_kernels.build_plan), got "
                        f"{type(plan).__name__}")
    T = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if plan.num_tokens != T:
        raise ValueError(f"plan was built for {plan.num_tokens} tokens but x has {T}")
    if plan.table.device != x.device:
        raise ValueError(f"plan is on {plan.table.device} but x is on {x.device}")
    return plan


def max_runs(num_tokens: int, groups: int, num_users: Optional[int]) -> int:
    """Runs after the sort are distinct ids: at most one per token (or per sequence), and at
    most one per user plus the users without a row."""
    bound = groups if groups else num_tokens
    if num_users is not None:
        bound = min(bound, num_users + 1)
    return max(1, bound)


def build_plan(user_ids: Optional[Tensor], lead_shape: torch.Size, device: torch.device,
               num_users: Optional[int] = None) -> BatchPlan:
    """The plan for tokens of leading shape `lead_shape` (x is [*lead_shape, in]).

    user_ids: None (no token has a row), one id per token (shaped like lead_shape) or one per
    sequence ([lead_shape[0]]). num_users bounds the runs (None: no bound but the tokens)."""
    T = 1
    for s in lead_shape:
        T *= int(s)
    groups = 0
    if user_ids is None:
        uid = torch.full((T,), -1, dtype=torch.long, device=device)
    elif tuple(user_ids.shape) == tuple(lead_shape):
        uid = user_ids.reshape(-1).to(device=device, dtype=torch.long)
    else:
        groups = user_ids.shape[0]
        per_seq = user_ids.to(device=device, dtype=torch.long).reshape((-1,) + (1,) * (len(lead_shape) - 1))
        uid = per_seq.expand(lead_shape).reshape(-1)
    table = torch.empty(6, T, dtype=torch.long, device=device)
    table[UID] = uid
    if T == 0:
        return BatchPlan(table, groups, 1)
    sorted_uid, order = torch.sort(uid, stable=True)
    table[ORDER] = order
    new = torch.ones(T, dtype=torch.long, device=device)
    new[1:] = (sorted_uid[1:] != sorted_uid[:-1]).long()
    run = torch.cumsum(new, 0) - 1
    table[RUN] = run
    pos = torch.arange(T, device=device)
    table[RUN_USER] = -1
    table[RUN_USER].scatter_(0, run, sorted_uid)
    table[RUN_START] = T
    table[RUN_START].scatter_reduce_(0, run, pos, "amin")
    table[RUN_END] = 0
    table[RUN_END].scatter_reduce_(0, run, pos + 1, "amax", include_self=True)
    # Runs past the last one: empty, at T.
    table[RUN_END] = torch.where(table[RUN_START] < T, table[RUN_END], T)
    return BatchPlan(table, groups, max_runs(T, groups, num_users))
