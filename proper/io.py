"""Adapters on disk: one safetensors file plus a JSON config, written atomically.

Layout of a directory written by ``save_adapters``:

- ``adapter_model.safetensors``: every ProperLinear tensor named
  ``<module name>.<parameter>`` (``model.layers.0.mlp.gate_proj.lora_A``); its metadata
  holds the format tag, the config as JSON and a SHA-256 of the config and the tensor data, so the file
  alone is enough to check and load.
- ``proper_config.json``: the same config, for people and tools.

Each file is written to a temporary name in the same directory and renamed into place,
so a crash never leaves a half-written file under the real name. Loading checks the
whole file (format, checksum, config, names, shapes, finite values) before it touches
the model: a file that fails any check is refused and the model is left unchanged.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ._fs import atomic_write, atomic_write_text, fsync_dir
from .config import ProperConfig
from .layer import BANK_PARAMS, adapter_shapes, base_features, owned_rows, whole
from .patching import _patch_of, find_targets, is_patched, patch_model, unpatch

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "proper_config.json"
FORMAT = "proper-adapters/1"

# Fields that change what the adapters compute; a file must agree on all of them.
_MATCHING_FIELDS = ("num_experts", "top_k", "rank", "alpha", "user_rank", "user_alpha", "num_users", "router", "temperature",
                    "share_user_router")
SHARED_ROUTER_KEY = "router_user"  # the model-wide user-aware router when config.share_user_router


class AdapterFileError(ValueError):
    """An adapter file that is missing, corrupt or does not fit the model."""


def _digest(tensors: dict[str, Tensor], config_json: str) -> str:
    """SHA-256 of the config and of every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(config_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor of a patched model, by checkpoint name ("<module>.<tensor>"; a
    user-aware router shared by every layer is stored once, as "router_user")."""
    patch = _patch_of(model)
    shared = patch.config.share_user_router and "user" in patch.config.router
    out = {}
    for name, layer in patch.layers.items():
        for pname, p in layer.adapter_parameters().items():
            if shared and pname == "router_user":
                out[SHARED_ROUTER_KEY] = p
            else:
                out[f"{name}.{pname}"] = p
    return out


def copy_into(p: Tensor, value: Tensor) -> None:
    """p.copy_(value) for a parameter, whole or sharded by FSDP (this rank takes its part)."""
    if hasattr(p, "full_tensor"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
    p.copy_(value)


def is_bank_key(key: str) -> bool:
    """Whether checkpoint name `key` is a user-bank table (rows = users)."""
    return key.rsplit(".", 1)[-1] in BANK_PARAMS


def save_adapters(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Write the adapters of a patched model to directory `path` (created if needed)."""
    shard = _patch_of(model).state.shard
    if shard is not None:
        raise ValueError(
            f"this model holds rank {shard[0]} of {shard[1]}'s shard of the user bank, not whole adapters: save it "
            "with proper.train.distributed.save_shard (and join the shards with merge_shards)"
        )
    return write_adapters(_patch_of(model).config, adapter_state_dict(model), path)


def write_adapters(config: ProperConfig, tensors: dict[str, Tensor], path: Union[str, os.PathLike],
                   extra_metadata: Optional[dict[str, str]] = None) -> Path:
    """Write adapter tensors (checkpoint names) with their config to directory `path`,
    atomically, with the checksum; what ``save_adapters`` writes for a model."""
    tensors = {k: whole(v).detach().cpu().contiguous() for k, v in tensors.items()}
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"refusing to save: adapter tensor {name!r} contains NaN or Inf")
    path = Path(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    if created:  # the new directory's own entry, durable like the files in it
        fsync_dir(path.parent)
    config_json = config.to_json()
    metadata = {**(extra_metadata or {}), "format": FORMAT, "config": config_json,
                "sha256": _digest(tensors, config_json)}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write_text(path / CONFIG_NAME, config_json + "\n")
    return path


def read_safetensors(path: Path, error: type) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, tensors) of a safetensors file on the CPU; a file that does not read raises
    `error` naming it."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise error(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _read(path: Path) -> tuple[ProperConfig, dict[str, Tensor]]:
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file():
        raise AdapterFileError(f"no adapter file at {weights}")
    metadata, tensors = read_safetensors(weights, AdapterFileError)
    if metadata.get("format") != FORMAT:
        raise AdapterFileError(f"{weights} is not a proper adapter file (format {metadata.get('format')!r})")
    if metadata.get("sha256") != _digest(tensors, metadata.get("config", "")):
        raise AdapterFileError(f"{weights} failed its checksum: the tensor data or the config is corrupt")
    try:
        config = ProperConfig.from_json(metadata["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise AdapterFileError(f"{weights} holds an invalid config: {e}") from None
    return config, tensors


def load_config(path: Union[str, os.PathLike]) -> ProperConfig:
    """The ProperConfig stored with the adapters at `path`."""
    return _read(Path(path))[0]


def load_adapters(model: nn.Module, path: Union[str, os.PathLike], *, backend: Optional[str] = None,
                  sparse_user_grad: Optional[bool] = None) -> nn.Module:
    """Load adapters saved by ``save_adapters`` into `model`; returns `model`.

    A model that is not patched yet is patched with the stored config first; the runtime
    choices, which a file never holds, are then ``backend`` and ``sparse_user_grad`` (their
    defaults when not given). A patched model keeps its own (``proper.set_backend`` changes
    the backend). Everything is checked before anything is copied: on any error the model is
    left as it was. A model holding a shard of the user bank takes its own users' rows of
    the file's bank.
    """
    runtime = {k: v for k, v in (("backend", backend), ("sparse_user_grad", sparse_user_grad)) if v is not None}
    patched_here = not is_patched(model)
    if runtime and not patched_here:
        raise ValueError(f"load_adapters: {', '.join(runtime)}= applies when it patches the model, and this model "
                         "is patched already (use proper.set_backend, or patch_model with a config)")
    config, tensors = _read(Path(path))
    if runtime:
        config = ProperConfig.from_dict({**config.to_dict(), **runtime})  # checks the values
    if patched_here:
        # The file must fit the model its config describes before anything is allocated (a
        # config may ask for a bank of 10**15 users next to tiny tensors).
        _check_shapes(model, config, tensors, str(path))
        try:
            patch_model(model, config)  # all or nothing: on an error the model is as it was
        except (ValueError, TypeError, RuntimeError, MemoryError) as e:
            raise AdapterFileError(f"{path}: patching the model with the file's config failed: "
                                   f"{type(e).__name__}: {e}") from None
    try:
        _check_and_copy(model, config, tensors, str(path))
    except BaseException:
        if patched_here:
            unpatch(model)
        raise
    return model


def _check_shapes(model: nn.Module, config: ProperConfig, tensors: dict[str, Tensor], where: str) -> None:
    """For an unpatched `model`: the file's tensors must be exactly the ones patching it with
    `config` would create, shape for shape. Allocates nothing."""
    try:
        targets = find_targets(model, config)
    except (ValueError, TypeError) as e:
        raise AdapterFileError(f"{where}: its config does not fit the model: {e}") from None
    shared = config.share_user_router and "user" in config.router
    expected: dict[str, tuple] = {}
    for name, module in targets.items():
        for pname, shape in adapter_shapes(*base_features(module), config).items():
            expected[SHARED_ROUTER_KEY if shared and pname == "router_user" else f"{name}.{pname}"] = shape
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterFileError(
            f"{where} does not fit the model its config describes: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise AdapterFileError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, but its config "
                                   f"(num_users={config.num_users}, experts={config.num_experts}, rank={config.rank}, "
                                   f"user_rank={config.user_rank}) and the model make it {shape}")


def _check_and_copy(model: nn.Module, config: ProperConfig, tensors: dict[str, Tensor], where: str) -> None:
    current = _patch_of(model).config
    for field in _MATCHING_FIELDS:
        if getattr(config, field) != getattr(current, field):
            raise AdapterFileError(
                f"{where} was saved with {field}={getattr(config, field)!r} but the model has "
                f"{field}={getattr(current, field)!r}"
            )
    params = adapter_state_dict(model)
    shard = _patch_of(model).state.shard
    if shard is not None:
        tensors = {k: t[owned_rows(t.shape[0], *shard)] if is_bank_key(k) else t for k, t in tensors.items()}
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise AdapterFileError(
            f"{where} does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for name, p in params.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(p.shape):
            raise AdapterFileError(f"{where}: {name} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
        if not t.is_floating_point():
            raise AdapterFileError(f"{where}: {name} has dtype {t.dtype}, expected a floating-point tensor")
        if not bool(torch.isfinite(t).all()):
            raise AdapterFileError(f"{where}: {name} contains NaN or Inf")
    with torch.no_grad():
        for name, p in params.items():
            copy_into(p, tensors[name])
