"""ProperLinear: a frozen linear layer plus group LoRA experts, routers and a user LoRA bank.

Design: docs/DESIGN.md#math (the math of the layer).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import proper_kernels
from proper_kernels.reference import Routing, gather_rows

from .config import ProperConfig

ADAPTER_PARAMS = ("lora_A", "lora_B", "router_x", "router_user", "router_h", "user_A", "user_B")
BANK_PARAMS = ("user_A", "user_B")  # the per-user LoRA bank: the tables a process may hold a shard of


def adapter_shapes(d_in: int, d_out: int, config: "ProperConfig", bank_rows: Optional[int] = None) -> dict:
    """The shape of each adapter tensor of a layer (in ADAPTER_PARAMS order; absent parts left
    out): what ProperLinear allocates, and what a loader checks a file against first."""
    E, r, N = config.num_experts, config.rank, config.num_users
    r_u = config.user_rank if config.has_user_bank else 0
    n_bank = N if bank_rows is None else bank_rows
    shapes = {"lora_A": (E, r, d_in), "lora_B": (E, d_out, r)}
    if "token" in config.router:
        shapes["router_x"] = (E, d_in)
    if "user" in config.router:
        shapes["router_user"] = (N + 1, E)
    if "lora" in config.router:
        shapes["router_h"] = (E, r_u)
    if config.has_user_bank:
        shapes["user_A"] = (n_bank, r_u, d_in)
        shapes["user_B"] = (n_bank, d_out, r_u)
    return shapes


def whole(t: Tensor) -> Tensor:
    """A parameter's whole value; for one sharded by FSDP this is a collective (every rank calls it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def owned_rows(num_rows: int, rank: int, world_size: int) -> Tensor:
    """The user rows rank `rank` of `world_size` owns: u % world_size == rank, ascending."""
    return torch.arange(rank, num_rows, world_size)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D: a linear layer whose weight is stored [in, out]."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if is_conv1d(base):
        d_in, d_out = base.weight.shape
        return d_in, d_out
    raise TypeError(f"base must be an nn.Linear or a transformers Conv1D, got {type(base).__name__}")


class UserState:
    """The user ids of the current batch, shared by every ProperLinear of one model.

    ``shard=(rank, world_size)``: the layers hold only the bank rows of the users
    ``u % world_size == rank`` (local row ``u // world_size``); ``user_ids`` then holds local
    rows, and the user-aware router, which every process keeps whole, is read through
    ``router_rows``.
    """

    def __init__(self, num_users: int, shard: Optional[tuple[int, int]] = None) -> None:
        self.num_users = num_users
        self.user_ids: Optional[Tensor] = None
        # The ids of the latest context, kept after it ends: activation checkpointing recomputes
        # a layer's forward during the backward, outside the context (see ProperLinear.forward).
        self.recompute_ids: Optional[Tensor] = None
        self.shard = shard
        self._router_rows: dict[torch.device, Tensor] = {}
        self._plan: Optional[tuple] = None  # (ids, lead shape, device, BatchPlan)

    def plan(self, user_ids: Tensor, lead_shape: torch.Size, device: torch.device):
        """The batch plan of these ids for tokens of `lead_shape`, built by the first layer
        that asks and shared by every other layer of the forward (and their backward)."""
        cached = self._plan
        if cached is not None and cached[0] is self.user_ids and cached[1] == tuple(lead_shape) and cached[2] == device:
            return cached[3]
        from proper_kernels.plan import build_plan

        built = build_plan(user_ids, lead_shape, device, self.bank_rows)
        self._plan = (self.user_ids, tuple(lead_shape), device, built)
        return built

    @property
    def bank_rows(self) -> int:
        """Rows of this process's bank tables."""
        if self.shard is None:
            return self.num_users
        return len(range(self.shard[0], self.num_users, self.shard[1]))

    def router_rows(self, device: torch.device) -> Tensor:
        """The rows of the whole user-aware router [num_users + 1, E] in local order: the
        owned users', then the default row."""
        if device not in self._router_rows:
            rows = torch.cat([owned_rows(self.num_users, *self.shard), torch.tensor([self.num_users])])
            self._router_rows[device] = rows.to(device)
        return self._router_rows[device]


class ProperLinear(nn.Module):
    """y = base(x) + s_g * sum_e g_e B_e A_e x + s_u * B^u A^u x (the math: proper_kernels/reference.py).

    ``base`` stays frozen and is called as it is, so a fresh layer (every B zero) gives
    exactly the base layer's output. User ids come from ``proper.user_context``; a layer
    made by hand can also be given ``user_ids=`` in ``forward``.
    """

    def __init__(self, base: nn.Module, config: ProperConfig, state: Optional[UserState] = None) -> None:
        super().__init__()
        if not isinstance(config, ProperConfig):
            raise TypeError(f"config must be a proper.ProperConfig, got {type(config).__name__}")
        d_in, d_out = base_features(base)
        self.base = base
        self.in_features, self.out_features = d_in, d_out
        self.num_experts = config.num_experts
        self.rank = config.rank
        self.user_rank = config.user_rank if config.has_user_bank else 0
        self.num_users = config.num_users
        self.top_k = config.top_k
        self.scaling = config.scaling
        self.user_scaling = config.user_scaling if config.has_user_bank else 0.0
        self.temperature = config.temperature
        self.dropout = config.dropout
        self.backend = config.backend
        self.sparse_user_grad = config.sparse_user_grad
        self.last_backend: Optional[str] = None
        self._state = state if state is not None else UserState(config.num_users)
        self._routing: Optional[Routing] = None
        for p in base.parameters():
            p.requires_grad_(False)

        w = base.weight
        kw = dict(device=w.device, dtype=w.dtype if w.is_floating_point() else torch.float32)
        # bank_rows: N, or this process's share of the users (a sharded bank)
        shapes = adapter_shapes(d_in, d_out, config, self._state.bank_rows)
        for name in ADAPTER_PARAMS:
            setattr(self, name, nn.Parameter(torch.empty(*shapes[name], **kw)) if name in shapes else None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A as PEFT (kaiming-uniform, a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), B = 0, routers N(0, 0.02)."""
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_A.uniform_(-bound, bound)
        self.lora_B.zero_()
        if self.user_A is not None:
            self.user_A.uniform_(-bound, bound)
            self.user_B.zero_()
        for router in (self.router_x, self.router_user, self.router_h):
            if router is not None:
                router.normal_(0.0, 0.02)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors by their checkpoint names (absent parts left out)."""
        return {n: getattr(self, n) for n in ADAPTER_PARAMS if getattr(self, n) is not None}

    @property
    def needs_user_ids(self) -> bool:
        return self.router_user is not None or self.user_A is not None

    def forward(self, x: Tensor, user_ids: Optional[Tensor] = None) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x must end with {self.in_features} features, got shape {tuple(x.shape)}")
        base_out = self.base(x)
        checked = False
        if user_ids is None and self.needs_user_ids:
            user_ids = self._state.user_ids
            checked = True  # validated once by user_context
            if user_ids is None and torch._C._current_graph_task_id() != -1:
                # Inside a backward: activation checkpointing (Trainer's, TRL's) recomputing this
                # forward after the context closed. It is the latest forward's batch: its ids.
                user_ids = self._state.recompute_ids
            if user_ids is None:
                raise RuntimeError(
                    "this ProperLinear has a user-aware router or a user bank but no user ids were "
                    "given: wrap the call in `with proper.user_context(model, user_ids):` "
                    "(use -1 for a user without a row)"
                )
        if not self.needs_user_ids:
            user_ids = None
        elif checked and user_ids.device != x.device:  # a model split over devices (device_map)
            user_ids = user_ids.to(x.device, non_blocking=True)
        plan = None
        if checked:  # the context's ids: one plan per batch, for every layer (built on first use)
            state, ids, lead, device = self._state, user_ids, x.shape[:-1], x.device
            plan = lambda: state.plan(ids, lead, device)  # noqa: E731
        # Adapters run in their own dtype (as PEFT does); the result goes back to base's dtype.
        # Under FSDP mixed precision the sharded adapters arrive in bf16/fp16 while the bank
        # and the user router (left out of FSDP) keep theirs: the adapters then run in the
        # wider dtype, and the small group tensors are cast to it (never the bank).
        dt = self.lora_A.dtype
        for table in (self.user_A, self.router_user):
            if table is not None:
                dt = torch.promote_types(dt, table.dtype)
        cast = lambda t: t if t is None or t.dtype == dt else t.to(dt)  # noqa: E731
        router_user = self.router_user
        if router_user is not None and router_user.device != x.device:  # shared table, model split over devices
            router_user = router_user.to(x.device)
        if router_user is not None and self._state.shard is not None:  # ids are rows of the bank shard
            # the rows in local order; the table's gradient stays sparse when the kernel's is
            router_user = gather_rows(router_user, self._state.router_rows(router_user.device))
        y, routing = proper_kernels.proper_linear(
            x.to(dt),
            base_out.to(dt),
            cast(self.lora_A),
            cast(self.lora_B),
            self.scaling,
            top_k=self.top_k,
            temperature=self.temperature,
            router_x=cast(self.router_x),
            router_user=router_user,
            router_h=cast(self.router_h),
            user_ids=user_ids,
            user_A=self.user_A,
            user_B=self.user_B,
            user_scaling=self.user_scaling,
            dropout=self.dropout,
            training=self.training,
            return_routing=True,
            check_user_ids=not checked,
            backend=self.backend,
            inplace=True,  # base_out is this call's own fresh tensor
            sparse_user_grad=self.sparse_user_grad,
            plan=plan,
        )
        self.last_backend = proper_kernels.last_backend("proper_linear")
        self._routing = routing if (self.training and self.num_experts > 1) else None
        return y.to(base_out.dtype)

    # -- auxiliary losses -------------------------------------------------------------

    def routing_stats(self) -> Optional[Tensor]:
        """[2E + 1] from the last training forward: per expert the (token, slot) assignments it
        got, per expert the summed router probability, and the number of tokens; None before
        any training forward or with one expert. Sums, so the stats of several processes add
        up to those of their joint batch."""
        if self._routing is None:
            return None
        logits, _, indices = self._routing
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        counts = torch.zeros(self.num_experts, device=logits.device).index_add_(
            0, indices.reshape(-1), torch.ones(indices.numel(), device=logits.device)
        )
        tokens = torch.full((1,), float(probs.shape[0]), device=logits.device)
        return torch.cat([counts, probs.sum(0), tokens])

    def load_balance_loss(self, stats: Optional[Tensor] = None) -> Tensor:
        """Switch-style balance over experts from the last training forward: E * sum_e f_e P_e.

        f_e: the share of (token, slot) assignments that went to expert e; P_e: the mean
        router probability of e. Equals 1 when routing is uniform; zero with one expert or
        before any training forward. ``stats``: ``routing_stats()`` to use instead of this
        layer's own (summed over processes, for the balance of the global batch).
        """
        stats = self.routing_stats() if stats is None else stats
        if stats is None:
            return torch.zeros((), device=self.lora_A.device, dtype=self.lora_A.dtype)
        E = self.num_experts
        counts, prob_sum, tokens = stats[:E], stats[E:2 * E], stats[2 * E]
        return E * ((counts / (tokens * self.top_k)) * (prob_sum / tokens)).sum()

    def distinctness_loss(self) -> Tensor:
        """The mean squared cosine similarity between different experts' (flattened) A
        matrices, plus the same for their B matrices.

        0 when the experts are pairwise orthogonal; 2 when they are all parallel (1 for A and
        1 for B).
        """
        E = self.num_experts
        if E < 2:
            return torch.zeros((), device=self.lora_A.device, dtype=self.lora_A.dtype)
        total = torch.zeros((), device=self.lora_A.device)  # a plain tensor, also under FSDP
        for w in (self.lora_A, self.lora_B):
            w = whole(w)  # FSDP: sharded again after forward; every rank reads it whole
            v = F.normalize(w.reshape(E, -1).float(), dim=1, eps=1e-12)
            gram = v @ v.t()
            off = gram - torch.diag_embed(torch.diagonal(gram))
            total = total + off.pow(2).sum() / (E * (E - 1))
        return total

    # -- merging ------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the population LoRA (one expert, gate 1) into the base weight; B becomes 0.

        Exact only with a single expert, whose gate is always 1; with more experts the gates
        depend on the token and no merge exists, so this raises.
        """
        if self.num_experts != 1:
            raise ValueError(
                f"merge() needs a single expert (the population LoRA), this layer has {self.num_experts}"
            )
        w = self.base.weight
        acc = torch.promote_types(w.dtype, torch.float32)
        delta = (self.lora_B[0].to(acc) @ self.lora_A[0].to(acc)) * self.scaling  # [out, in]
        w.add_((delta.t() if is_conv1d(self.base) else delta).to(w.dtype))
        self.lora_B.zero_()

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, top_k={self.top_k}, "
            f"rank={self.rank}, users={self.num_users if self.user_A is not None else 0}, "
            f"user_rank={self.user_rank}, backend={self.backend!r}"
        )
