"""ProperConfig: every hyper-parameter of a patched model, saved next to its adapters.

Design: docs/DESIGN.md#config (what each field means).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Union

ROUTER_SOURCES = ("token", "user", "lora")
BACKENDS = ("auto", "triton", "cuda", "torch")


# How a process runs the layers, not what was trained: chosen at patch time and never saved
# (``to_json`` leaves them out; ``load_adapters(..., backend=, sparse_user_grad=)`` sets them).
RUNTIME_FIELDS = ("backend", "sparse_user_grad")


@dataclass
class ProperConfig:
    """Hyper-parameters of ProperLinear.

    num_experts/top_k/rank/alpha: the group LoRA experts (s_g = alpha / rank).
    user_rank/user_alpha/num_users: the per-user LoRA bank (s_u = user_alpha / user_rank);
    the bank exists when num_users > 0 and user_rank > 0.
    router: which logit sources are on: "token" (W_x x), "user" (R[u], the user-aware
    router) and "lora" (W_h h_u, the LoRA-aware router; needs the user bank).
    share_user_router: one user-aware router table R for the whole model instead of one per
    layer, so that a user's group (argmax_e R[u, e]) is one expert index in every layer; the
    PROPER pipeline turns it on.
    sparse_user_grad: the per-user tables (user bank, user-aware router) get sparse gradients
    over the users in the batch, for banks of millions of users; train them with
    ``proper.optim.LazyAdamW`` (the trainer does), which keeps optimizer state only for the
    users it has seen. Torch and Triton backends (the CUDA backend refuses it).
    """

    num_experts: int = 8
    top_k: int = 2
    rank: int = 16
    alpha: float = 32.0
    user_rank: int = 8
    user_alpha: float = 16.0
    num_users: int = 0
    router: tuple[str, ...] = ("token",)
    temperature: float = 1.0
    dropout: float = 0.0
    target_modules: Union[str, tuple[str, ...]] = ("gate_proj", "up_proj", "down_proj")
    backend: str = "auto"
    share_user_router: bool = False
    sparse_user_grad: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.router, str):
            self.router = (self.router,)
        self.router = tuple(self.router)
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
        for name in ("num_experts", "top_k", "rank", "user_rank", "num_users"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ProperConfig.{name} must be an int, got {value!r}")
        for name in ("num_experts", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProperConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("user_rank", "num_users"):
            if getattr(self, name) < 0:
                raise ValueError(f"ProperConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"ProperConfig.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        for name in ("alpha", "user_alpha", "temperature", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise TypeError(f"ProperConfig.{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        if not 0 < self.temperature < float("inf"):
            raise ValueError(f"ProperConfig.temperature must be positive and finite, got {self.temperature}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ProperConfig.dropout must be in [0, 1), got {self.dropout}")
        unknown = [s for s in self.router if s not in ROUTER_SOURCES]
        if unknown or len(set(self.router)) != len(self.router):
            raise ValueError(f"ProperConfig.router must be distinct names from {ROUTER_SOURCES}, got {self.router}")
        if "lora" in self.router and not self.has_user_bank:
            raise ValueError(
                "ProperConfig.router has 'lora' (the LoRA-aware router), which needs the user bank: "
                f"set num_users > 0 and user_rank > 0 (got num_users={self.num_users}, user_rank={self.user_rank})"
            )
        for name in ("share_user_router", "sparse_user_grad"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ProperConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"ProperConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"ProperConfig.target_modules must be a regex or non-empty names, got {self.target_modules!r}")

    @property
    def has_user_bank(self) -> bool:
        return self.num_users > 0 and self.user_rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def user_scaling(self) -> float:
        return self.user_alpha / self.user_rank if self.user_rank > 0 else 0.0

    def to_dict(self, runtime: bool = True) -> dict[str, Any]:
        """Every field; ``runtime=False`` leaves out the runtime choices (RUNTIME_FIELDS)."""
        d = dataclasses.asdict(self)
        d["router"] = list(self.router)
        if not isinstance(self.target_modules, str):
            d["target_modules"] = list(self.target_modules)
        if not runtime:
            for name in RUNTIME_FIELDS:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProperConfig":
        if not isinstance(d, dict):
            raise TypeError(f"a ProperConfig must come from a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ProperConfig fields: {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        """The saved form: what the adapters are, without how this process runs them (the
        runtime choices, RUNTIME_FIELDS, as PEFT keeps its runtime config out of
        adapter_config.json)."""
        return json.dumps(self.to_dict(runtime=False), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ProperConfig":
        """The saved form back; the runtime choices take their defaults (files written before
        they were left out still carry them, and they are dropped)."""
        d = json.loads(text)
        if isinstance(d, dict):
            d = {k: v for k, v in d.items() if k not in RUNTIME_FIELDS}
        return cls.from_dict(d)
