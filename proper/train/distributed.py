"""Training on several processes (torchrun / accelerate) with a user-sharded bank.

Each rank owns the users ``row % world == rank``: a batch is drawn the same on every rank
(``batch_at(step)``), and each rank keeps the sequences of the users it owns (a sequence
without a user, row -1, goes to rank ``index % world``), and holds only their rows of the
user bank (``patch_model(..., shard=(rank, world))`` allocates just those; ``shard_bank``
cuts a whole bank down to them). The group experts and routers are synchronised by
``torch.nn.parallel.DistributedDataParallel`` (gradients summed), or sharded by FSDP2
(``TrainConfig(parallel="fsdp")``, ``wrap_fsdp``); the bank is left out of both, so its
rows are never all-reduced, and so are the user-aware router tables (E numbers a user),
which every rank holds whole and whose gradients the trainer sums (``sum_grads``; sparse
ones stay sparse). Each rank's loss is its sum of token losses over the number of
label tokens of the whole global batch, so the summed gradients are those of one process
training on the global batch. ``proper.train.trainer.train`` does all this when a process group is
set up (``torchrun --nproc_per_node N``, ``accelerate launch --multi_gpu``), with one
checkpoint directory per rank.

Checkpoints are shards: rank r writes the shared tensors and the bank rows it owns
(``save_shard``); ``merge_shards`` rebuilds the full adapters (loadable by one process with
``load_adapters``) and ``split_adapters`` cuts full adapters into shards for another world
size.

Auxiliary losses get one process's gradients too: the load balance is that of the global
batch (every layer's routing statistics summed over ranks in one differentiable all-reduce,
``all_reduce_sum``; each rank adds 1/world of it), and the distinctness loss, a function of
the shared weights alone, counts 1/world on each rank under DDP and whole under FSDP, where
each rank's gradient goes to its own shard. (A rank that owns none of a batch's sequences
runs one unscored sequence, whose tokens the load balance then counts.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from ..io import WEIGHTS_NAME, _read, adapter_state_dict, copy_into, is_bank_key, write_adapters
from ..layer import owned_rows
from ..patching import _patch_of, bank_shard, check_shard, proper_layers

SHARD_META = "proper_shard"


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def owners(user_rows: Tensor, world_size: int) -> Tensor:
    """The rank owning each sequence: its user's row mod the world size (row -1: its index)."""
    index = torch.arange(user_rows.shape[0], device=user_rows.device)
    return torch.where(user_rows >= 0, user_rows, index) % world_size


def n_label_tokens(labels: Tensor) -> int:
    """Tokens a causal LM is scored on: labels shifted by one, -100 left out."""
    return int((labels[:, 1:] != -100).sum())


def local_batch(batch: dict, rank: int, world_size: int) -> tuple[dict, int]:
    """This rank's sequences of a global batch (with "user_rows") and the global number of
    label tokens. A rank that owns none of them gets one sequence without a user and with
    no label token, so that it still runs the forward and backward DDP expects of it."""
    n_global = n_label_tokens(batch["labels"])
    if n_global == 0:
        raise ValueError("the global batch has no label token")
    keep = owners(batch["user_rows"], world_size) == rank
    if not bool(keep.any()):
        dummy = {k: v[:1].clone() for k, v in batch.items()}
        dummy["labels"].fill_(-100)
        dummy["user_rows"].fill_(-1)
        return dummy, n_global
    return {k: v[keep] for k, v in batch.items()}, n_global


def sequence_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """[B]: each sequence's summed next-token NLL over its label tokens (-100 left out)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                             ignore_index=-100, reduction="none").sum(1)


def token_nll_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token NLL over the label tokens (what a causal LM's loss averages)."""
    return sequence_nll(logits, labels).sum()


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of `t` over ranks, differentiable (the backward sums the gradients too)."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


def bank_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if is_bank_key(n)]


def shard_bank(model: nn.Module, rank: int, world_size: int) -> nn.Module:
    """Keep only the bank rows of the users ``u % world_size == rank`` (the rest is freed);
    what ``patch_model(..., shard=(rank, world_size))`` allocates from the start. The
    trainer does this to a whole model it trains on several processes."""
    rank, world_size = check_shard((rank, world_size))
    state = _patch_of(model).state
    if state.shard is not None:
        if state.shard != (rank, world_size):
            raise ValueError(f"the model already holds shard {state.shard} of the user bank, not {(rank, world_size)}")
        return model
    layers = [layer for layer in proper_layers(model).values() if layer.user_A is not None]
    if not layers:
        raise ValueError("the model has no user bank to shard")
    rows = owned_rows(state.num_users, rank, world_size)
    with torch.no_grad():
        for layer in layers:
            for name in ("user_A", "user_B"):
                old = getattr(layer, name)
                part = nn.Parameter(old[rows.to(old.device)].clone(), requires_grad=old.requires_grad)
                setattr(layer, name, part)
    state.shard = (rank, world_size)
    return model


def _sum_hook(state, bucket):
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


def wrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel over everything but the per-user tables, gradients summed.

    The user bank stays out (each rank trains its own users' rows), and so do the user-aware
    router tables, whose gradients may be sparse (DDP cannot reduce those): every rank holds
    them whole and the caller sums their gradients after backward with ``sum_grads`` over
    ``user_routers(model)``, as under FSDP."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    routers = {id(p) for p in user_routers(model)}
    # every name of a table shared by the layers: DDP looks each module's parameters up by name
    tables = bank_parameter_names(model) + [n for n, p in model.named_parameters(remove_duplicate=False)
                                            if id(p) in routers]
    if not any(p.requires_grad for n, p in model.named_parameters(remove_duplicate=False) if n not in set(tables)):
        return model  # only per-user tables train: nothing for DDP to synchronise
    DDP._set_params_and_buffers_to_ignore_for_model(model, tables)
    ddp = DDP(model, find_unused_parameters=False)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


# -- FSDP2 ------------------------------------------------------------------------------------

# bf16 only: fp16 would need loss scaling, which neither path does
MIXED_PRECISION = {"bf16": torch.bfloat16}


def user_routers(model: nn.Module) -> list[nn.Parameter]:
    """The user-aware router tables of a patched model, each once (a shared one is one)."""
    seen: dict[int, nn.Parameter] = {}
    for layer in proper_layers(model).values():
        if layer.router_user is not None:
            seen.setdefault(id(layer.router_user), layer.router_user)
    return list(seen.values())


def wrap_fsdp(model: nn.Module, mixed_precision: Optional[str] = None) -> list[nn.Parameter]:
    """Shard `model` in place with FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit per
    transformer block (the classes in ``model._no_split_modules``; a ProperLinear outside
    every block gets a unit of its own), then the root. Gradients are summed over ranks.

    Left out of FSDP: the user bank (each rank holds and trains its own users' rows) and the
    user-aware router tables (a table shared by every layer cannot belong to one unit); the
    router tables stay whole on every rank and the caller sums their gradients after
    backward with ``sum_grads`` (what this returns). ``mixed_precision="bf16"``: the
    sharded parameters compute in bf16, gradients are reduced in float32; the
    bank and the routers stay in their own dtype (the adapters then compute in float32).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not hasattr(FSDPModule, "set_gradient_divide_factor"):
        raise RuntimeError(f"FSDP needs torch >= 2.8 (set_gradient_divide_factor), this is {torch.__version__}")
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {sorted(MIXED_PRECISION)} or None, got {mixed_precision!r}")
    layers = list(proper_layers(model).values())
    routers = user_routers(model)
    ignored = set(routers) | {p for layer in layers for p in (layer.user_A, layer.user_B) if p is not None}
    mp = (MixedPrecisionPolicy(param_dtype=MIXED_PRECISION[mixed_precision], reduce_dtype=torch.float32)
          if mixed_precision else MixedPrecisionPolicy())
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    inside = {id(layer) for b in blocks for layer in b.modules()}
    # a ProperLinear must sit in a unit that reshards after forward (not the root), so that
    # after forward its weights are sharded again and the distinctness loss reads them whole
    units = [layer for layer in layers if id(layer) not in inside] + blocks
    for unit in units + [model]:
        fully_shard(unit, mp_policy=mp, ignored_params=ignored)
    for unit in units + [model]:  # a sum, as DDP's comm hook: the loss is already global
        unit.set_gradient_divide_factor(1.0)
        if hasattr(unit, "set_force_sum_reduction_for_comms"):
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
        elif dist.get_backend() == "gloo":
            raise RuntimeError(f"FSDP over gloo needs set_force_sum_reduction_for_comms (torch {torch.__version__})")
    return routers


def sum_grads(params: Sequence[nn.Parameter], sparse: bool = False) -> None:
    """All-reduce (sum) the gradients of parameters every rank holds whole (after backward).

    ``sparse`` (row-sparse gradients, ``sparse_user_grad``): the result is sparse over the
    rows any rank touched, with their summed values, as one process's gradient would be."""
    for p in params:
        if not p.requires_grad:
            continue
        g = p.grad
        if not sparse:
            g = torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g)
            dist.all_reduce(g)
            p.grad = g
            continue
        dense = torch.zeros_like(p)
        touched = torch.zeros(p.shape[0], device=p.device, dtype=p.dtype)
        if g is not None and g.is_sparse:
            g = g.coalesce()
            dense.index_add_(0, g.indices()[0], g.values())
            touched[g.indices()[0]] = 1
        elif g is not None:
            dense += g
            touched.fill_(1)
        dist.all_reduce(dense)
        dist.all_reduce(touched)
        rows = touched.nonzero().squeeze(1)
        p.grad = torch.sparse_coo_tensor(rows[None], dense[rows], tuple(p.shape), is_coalesced=True,
                                         check_invariants=False)


# -- sharded checkpoints ----------------------------------------------------------------------


def _write_shard(config, tensors: dict[str, Tensor], path: Union[str, os.PathLike], rank: int,
                 world_size: int, whole: bool = True) -> Path:
    """Write rank `rank`'s shard; `whole`: the bank tensors hold every user (else only the rank's)."""
    part = {k: (t[owned_rows(t.shape[0], rank, world_size)] if whole and is_bank_key(k) else t)
            for k, t in tensors.items()}
    return write_adapters(config, part, path, {SHARD_META: json.dumps({"rank": rank, "world": world_size})})


def save_shard(model: nn.Module, path: Union[str, os.PathLike], rank: Optional[int] = None,
               world_size: Optional[int] = None) -> Path:
    """Rank `rank`'s shard: the shared adapter tensors and the bank rows it owns. A model
    holding a shard of the bank (``shard_bank``) writes its own (rank and world size may be
    left out)."""
    held = bank_shard(model)
    if held is not None and (rank, world_size) not in ((None, None), held):
        raise ValueError(f"the model holds shard {held} of the user bank; it cannot write shard {(rank, world_size)}")
    if held is None and (rank is None or world_size is None):
        raise ValueError("save_shard needs rank and world_size for a model that holds the whole bank")
    rank, world_size = held or check_shard((rank, world_size))
    return _write_shard(_patch_of(model).config, adapter_state_dict(model), path, rank, world_size,
                        whole=held is None)


def _shard_info(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(Path(path) / WEIGHTS_NAME), "pt") as f:
        meta = f.metadata() or {}
    if SHARD_META not in meta:
        raise ValueError(f"{path} is not a shard written by proper.train.distributed.save_shard")
    return json.loads(meta[SHARD_META])


def merge_shards(shards: Sequence[Union[str, os.PathLike]], out: Union[str, os.PathLike]) -> Path:
    """Full adapters (as ``save_adapters`` writes them) from the shards of every rank."""
    infos = [_shard_info(Path(p)) for p in shards]
    world_size = infos[0]["world"]
    if sorted(i["rank"] for i in infos) != list(range(world_size)) or any(i["world"] != world_size for i in infos):
        raise ValueError(f"shards must be ranks 0..{world_size - 1} of one world, got {infos}")
    read = {i["rank"]: _read(Path(p)) for i, p in zip(infos, shards)}
    config, first = read[0]
    full = {}
    for key, t in first.items():
        if not is_bank_key(key):
            full[key] = t
            continue
        rows = config.num_users
        whole = t.new_zeros((rows,) + tuple(t.shape[1:]))
        for r, (_, tensors) in read.items():
            whole[owned_rows(rows, r, world_size)] = tensors[key]
        full[key] = whole
    return write_adapters(config, full, out)


def split_adapters(path: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], world_size: int) -> list[Path]:
    """Cut full adapters into `world_size` shards (``out_dir/rank-<r>``)."""
    config, tensors = _read(Path(path))
    return [_write_shard(config, tensors, Path(out_dir) / f"rank-{r}", r, world_size) for r in range(world_size)]


def load_shard(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Copy a shard into a patched model: the shared tensors and the owned bank rows (into
    the whole bank, or as the bank of a model holding that same shard)."""
    info = _shard_info(Path(path))
    config, tensors = _read(Path(path))
    params = adapter_state_dict(model)
    if set(params) != set(tensors):
        raise ValueError(f"{path} does not fit the model's adapters")
    shard = (info["rank"], info["world"])
    held = bank_shard(model)
    if held is not None and held != shard:
        raise ValueError(f"{path} is shard {shard} of the user bank but the model holds shard {held}")
    for key, p in params.items():
        rows = p.shape[0] if held is not None or not is_bank_key(key) else len(owned_rows(p.shape[0], *shard))
        if tuple(tensors[key].shape) != (rows,) + tuple(p.shape[1:]):
            raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, which does not fit the model")
    with torch.no_grad():
        for key, p in params.items():
            if is_bank_key(key) and held is None:
                p[owned_rows(p.shape[0], *shard).to(p.device)] = tensors[key].to(p.device, p.dtype)
            else:
                copy_into(p, tensors[key])
    return model
