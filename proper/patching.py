"""Swap ProperLinear into a Hugging Face model in place, and undo it.

Like Liger-Kernel's ``apply_liger_kernel_to_*`` the swap is explicit and reversible:
``patch_model`` records every module it replaced and every ``requires_grad`` flag it
changed, and ``unpatch`` puts the very same objects and flags back.

Design: docs/DESIGN.md#patching (patching and user_context).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

import proper_kernels

from .config import BACKENDS, ProperConfig
from .layer import ProperLinear, UserState, is_conv1d

_ATTR = "_proper"
MERGED_ATTR = "_proper_merged"  # the population LoRAs merge() folded into the base weights


def merged_loras(model: nn.Module) -> list[dict[str, tuple[Tensor, Tensor, float]]]:
    """The population LoRAs that :func:`merge` folded into `model`'s base weights, oldest
    first: per merge, {module name: (A [r, in], B [out, r], scaling)} (float32 copies). The
    weights alone no longer show them, and an exact PEFT export onto the original model
    needs them (``proper.export``)."""
    return list(getattr(model, MERGED_ATTR, []))


class _Patch:
    """What patch_model did to a model, kept on it so that unpatch can undo it."""

    def __init__(self, config: ProperConfig, state: UserState) -> None:
        self.config = config
        self.state = state
        self.layers: dict[str, ProperLinear] = {}
        self.requires_grad: dict[str, bool] = {}


def _patch_of(model: nn.Module) -> _Patch:
    patch = getattr(model, _ATTR, None)
    if patch is None:
        raise ValueError("model is not patched: call proper.patch_model(model, config) first")
    return patch


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def _matches(name: str, targets: Union[str, Sequence[str]]) -> Optional[str]:
    """The pattern that selects module `name`, or None. A str is a regex matched against the
    whole module name; a list holds names matched against the end of the module name."""
    if isinstance(targets, str):
        return targets if re.fullmatch(targets, name) else None
    for t in targets:
        if name == t or name.endswith("." + t):
            return t
    return None


def patch_model(
    model: nn.Module, config: ProperConfig, *, target_modules: Optional[Union[str, Sequence[str]]] = None,
    shard: Optional[tuple[int, int]] = None,
) -> nn.Module:
    """Replace the target linear layers of `model` by ProperLinear, in place; returns `model`.

    ``target_modules`` (default ``config.target_modules``): a list of names matched against
    the end of each module's dotted name (``"gate_proj"``, ``"output.dense"``), or one regex
    matched against the whole name. Every pattern must match a module, and every match must
    be an ``nn.Linear`` or a transformers ``Conv1D``. Every parameter outside the adapters is
    frozen, as PEFT does.

    ``shard=(rank, world_size)`` allocates only the user-bank rows of the users
    ``u % world_size == rank`` (one process of a user-sharded run, ``proper.train.distributed``);
    ``user_context`` then takes only those users.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, ProperConfig):
        raise TypeError(f"config must be a proper.ProperConfig, got {type(config).__name__}")
    if is_patched(model):
        raise ValueError("model is already patched; call proper.unpatch(model) first")
    if target_modules is not None:
        config = ProperConfig.from_dict({**config.to_dict(), "target_modules": target_modules})
    if shard is not None:
        shard = check_shard(shard)
        if not config.has_user_bank:
            raise ValueError("shard= splits the user bank across processes, but the config has no user bank "
                             f"(num_users={config.num_users}, user_rank={config.user_rank})")
    found = find_targets(model, config)

    # All or nothing: every layer is built (the allocations, the step that can fail) before
    # the model is touched; the swap restores everything if it fails part-way.
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    patch = _Patch(config, UserState(config.num_users, shard))
    patch.requires_grad = requires_grad
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        layers = {name: ProperLinear(module, config, state=patch.state) for name, module in found.items()}
        if config.share_user_router and "user" in config.router:
            shared = next(iter(layers.values())).router_user
            for layer in layers.values():
                layer.router_user = shared  # one Parameter: named_parameters() and optimizers see it once
        for p in model.parameters():
            p.requires_grad_(False)
        for name, layer in layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer)
            swapped.append((parent, child, found[name]))
            patch.layers[name] = layer
        setattr(model, _ATTR, patch)
        for entry in _entry_points(model):
            accept_user_ids(entry)
    except BaseException:
        for parent, child, module in reversed(swapped):
            setattr(parent, child, module)
        if hasattr(model, _ATTR):
            delattr(model, _ATTR)
        for entry in _entry_points(model):
            _drop_user_ids(entry)
        for n, p in model.named_parameters():
            if n in requires_grad:
                p.requires_grad_(requires_grad[n])
        raise
    return model


def find_targets(model: nn.Module, config: ProperConfig) -> dict[str, nn.Module]:
    """The modules of `model` that config.target_modules names, by dotted name (checked:
    every pattern matches, every match is an nn.Linear or a Conv1D). Changes nothing."""
    targets = config.target_modules
    found: dict[str, nn.Module] = {}
    used: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, ProperLinear):
            raise ValueError(f"model already holds a ProperLinear at {name!r}")
        pattern = _matches(name, targets)
        if pattern is None:
            continue
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise TypeError(
                f"target_modules pattern {pattern!r} matches {name!r}, a {type(module).__name__}; "
                "only nn.Linear and transformers Conv1D layers can be patched"
            )
        found[name] = module
        used.add(pattern)
    if isinstance(targets, str):
        missing = [] if found else [targets]
    else:
        missing = [t for t in targets if t not in used]
    if missing:
        raise ValueError(f"target_modules pattern(s) {missing} match no module of {type(model).__name__}")
    return found


def check_shard(shard) -> tuple[int, int]:
    """(rank, world_size) of a bank shard, validated."""
    try:
        rank, world_size = shard
    except (TypeError, ValueError):
        raise TypeError(f"shard must be a (rank, world_size) pair, got {shard!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (rank, world_size)):
        raise TypeError(f"shard must be a pair of ints (rank, world_size), got {shard!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"shard must have 0 <= rank < world_size, got {shard!r}")
    return rank, world_size


def bank_shard(model: nn.Module) -> Optional[tuple[int, int]]:
    """(rank, world_size) when the model holds one process's shard of the user bank, else None."""
    return _patch_of(model).state.shard


def proper_layers(model: nn.Module) -> dict[str, ProperLinear]:
    """The ProperLinear layers of a patched model, by module name."""
    return dict(_patch_of(model).layers)


def get_config(model: nn.Module) -> ProperConfig:
    return _patch_of(model).config


def unpatch(model: nn.Module) -> nn.Module:
    """Put back the original modules (the very same objects) and requires_grad flags,
    dropping the adapters: PEFT's ``unload`` (``proper.unload`` is the same function)."""
    patch = _patch_of(model)
    for name, layer in patch.layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    for n, p in model.named_parameters():
        if n in patch.requires_grad:
            p.requires_grad_(patch.requires_grad[n])
    delattr(model, _ATTR)
    for entry in _entry_points(model):
        _drop_user_ids(entry)
    return model


unload = unpatch  # PEFT's name for it


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold each layer's population LoRA into its base weight and unpatch, as PEFT's
    ``merge_and_unload`` does (``merge`` is the same function). Needs one expert and no user
    bank or user router, where the result is exact; otherwise raises and leaves the model as
    it was."""
    patch = _patch_of(model)
    for name, layer in patch.layers.items():
        if layer.num_experts != 1 or layer.needs_user_ids:
            raise ValueError(
                f"cannot merge {name!r}: merging is exact only for a single expert with no user "
                "bank or user router (the population stage)"
            )
    folded = {name: (layer.lora_A[0].detach().float().cpu().clone(), layer.lora_B[0].detach().float().cpu().clone(),
                     float(layer.scaling)) for name, layer in patch.layers.items()}
    for layer in patch.layers.values():
        layer.merge()
    setattr(model, MERGED_ATTR, merged_loras(model) + [folded])
    return unpatch(model)


merge = merge_and_unload  # the name proper had first


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Choose the kernel backend of every ProperLinear: "auto" | "triton" | "cuda" | "torch".

    Raises (and changes nothing) when that backend cannot run on the model's device.
    """
    patch = _patch_of(model)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for layer in patch.layers.values():
        proper_kernels.select_backend(backend, layer.lora_A.device, layer.lora_A.dtype)
    for layer in patch.layers.values():
        layer.backend = backend
    patch.config = ProperConfig.from_dict({**patch.config.to_dict(), "backend": backend})
    return model


def _user_states(model: nn.Module) -> list[UserState]:
    """The user states of `model`'s ProperLinear layers: the one patch_model made, or those of
    the layers a user put in a module by hand (distinct ones, in module order)."""
    if is_patched(model):
        return [_patch_of(model).state]
    states: dict[int, UserState] = {}
    for module in model.modules():
        if isinstance(module, ProperLinear):
            states.setdefault(id(module._state), module._state)
    if not states:
        raise ValueError(f"{type(model).__name__} holds no ProperLinear layer: call proper.patch_model(model, "
                         "config) first, or build it with proper.ProperLinear layers")
    return list(states.values())


def _device_of(model: nn.Module, fallback: torch.device) -> torch.device:
    for module in model.modules():
        if isinstance(module, ProperLinear):
            return module.lora_A.device
    return fallback


@contextlib.contextmanager
def user_context(model: nn.Module, user_ids: Union[Tensor, Sequence[int]]) -> Iterator[Tensor]:
    """Give every ProperLinear of `model` the user of each sequence for the calls inside.

    ``user_ids``: one integer per sequence of the batch (a LongTensor [batch] or a list);
    -1 is a user without a row (cold start: group path, default router row). Ids are
    checked once here; any id < -1 or >= num_users is an error naming it. Contexts nest.
    On a model holding a shard of the bank (``patch_model(..., shard=)``), every user must be
    one of the shard's. `model` is a patched model, or any module holding ProperLinear layers.
    """
    states = _user_states(model)
    if not isinstance(user_ids, Tensor):
        try:
            user_ids = torch.as_tensor(user_ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"user_ids must be a tensor or a list of integers: {e}") from None
    from proper_kernels._checks import check_id_range, signed_ids

    user_ids = signed_ids(user_ids)  # int64 before the range check, so -1 keeps its meaning
    if user_ids.dim() != 1:
        raise ValueError(f"user_ids must be 1-D (one id per sequence), got shape {tuple(user_ids.shape)}")
    for state in states:
        check_id_range(user_ids, state.num_users)
    ids = user_ids.to(device=_device_of(model, user_ids.device), dtype=torch.long)
    local = []
    for state in states:
        rows = ids
        if state.shard is not None:
            rank, world_size = state.shard
            foreign = (ids >= 0) & (ids % world_size != rank)
            if bool(foreign.any()):
                raise ValueError(
                    f"user_ids {ids[foreign][:5].tolist()} are not in this model's shard of the user bank: rank "
                    f"{rank} of {world_size} holds the users u % {world_size} == {rank}"
                )
            rows = torch.where(ids >= 0, ids // world_size, ids)  # rows of the shard
        local.append(rows)
    previous = [state.user_ids for state in states]
    for state, rows in zip(states, local):
        state.user_ids = state.recompute_ids = rows
    try:
        yield local[0]
    finally:
        for state, prev in zip(states, previous):
            state.user_ids = prev


_FORWARD_ATTR = "_proper_forward"  # set on a model whose forward accept_user_ids wrapped


def accept_user_ids(model: nn.Module) -> nn.Module:
    """Let ``model(..., user_ids=LongTensor[batch])`` (and so ``model.generate(...,
    user_ids=...)``, transformers' Trainer and TRL) carry the users: the call runs inside
    ``user_context(model, user_ids)``. The forward's signature shows ``user_ids``, so
    Trainer keeps that column of a dataset. ``patch_model`` does this; call it on a module
    you built with ProperLinear layers yourself. ``unpatch`` undoes it."""
    if getattr(model, _FORWARD_ATTR, None) is not None:
        return model
    original = model.forward
    sig = inspect.signature(original)
    if "user_ids" in sig.parameters:
        raise ValueError(f"{type(model).__name__}.forward already takes a user_ids argument")

    @functools.wraps(original)
    def forward(*args, user_ids=None, **kwargs):
        if user_ids is None:
            return original(*args, **kwargs)
        with user_context(model, user_ids):
            return original(*args, **kwargs)

    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    params.insert(at, inspect.Parameter("user_ids", inspect.Parameter.KEYWORD_ONLY, default=None))
    forward.__signature__ = sig.replace(parameters=params)
    model.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
    setattr(model, _FORWARD_ATTR, original)
    return model


def _entry_points(model: nn.Module) -> list[nn.Module]:
    """The modules whose forward takes user_ids= on a patched model: the model, and its
    backbone (a Hugging Face model's ``base_model``), which trainers such as TRL call
    directly for their fused loss."""
    out = [model]
    backbone = getattr(model, "base_model", None)
    if isinstance(backbone, nn.Module) and backbone is not model:
        out.append(backbone)
    return out


def _drop_user_ids(model: nn.Module) -> None:
    if getattr(model, _FORWARD_ATTR, None) is not None:
        del model.forward
        delattr(model, _FORWARD_ATTR)


def aux_losses(model: nn.Module, reduce: Optional[Callable[[Tensor], Tensor]] = None) -> dict[str, Tensor]:
    """Mean over layers of the load-balance loss (from the last training forward) and of
    the expert distinctness loss, for the trainer to weight and add.

    ``reduce``: sums a tensor over processes, differentiably (the trainer passes
    ``torch.distributed.nn.functional.all_reduce``): the load balance is then that of the
    global batch, from every layer's routing statistics summed in one call."""
    layers = list(_patch_of(model).layers.values())
    stats = [layer.routing_stats() for layer in layers]
    if reduce is not None and any(s is not None for s in stats):
        sizes = [0 if s is None else s.numel() for s in stats]
        summed = reduce(torch.cat([s for s in stats if s is not None])).split([n for n in sizes if n])
        it = iter(summed)
        stats = [None if n == 0 else next(it) for n in sizes]
    balance = torch.stack([layer.load_balance_loss(s).float() for layer, s in zip(layers, stats)]).mean()
    distinct = torch.stack([layer.distinctness_loss().float() for layer in layers]).mean()
    return {"load_balance": balance, "distinctness": distinct}
