"""A small, resumable trainer for the adapters of a patched model.

Every `save_every` steps it writes a checkpoint (adapters through ``save_adapters``, the
optimizer state and the RNG state as safetensors, the step and losses as JSON, both under
one SHA-256 digest) into a new directory, fsyncs it, then points ``latest`` at it with an
atomic rename: a run killed at any moment (or a power loss) restarts from the last complete
checkpoint and, being seeded per step, ends with the same adapters as an uninterrupted run.
A corrupt checkpoint is refused, naming the earlier one that is intact (the previous
checkpoint is kept until the next one is written). Batches come from ``batch_at(step)``, so the data order
depends on the step alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch import Tensor

from . import distributed
from .._fs import atomic_write_text, fsync_dir, fsync_tree
from ..io import _digest, load_adapters, save_adapters
from ..optim import LazyAdamW
from ..patching import aux_losses, bank_shard, is_patched, proper_layers, user_context

LATEST = "latest"
PARALLEL = ("ddp", "fsdp")
SCHEDULES = ("constant", "cosine")


def lr_factor(cfg: "TrainConfig", step: int) -> float:
    """The learning rate of `step` (0-based) relative to cfg.lr."""
    if cfg.schedule == "constant":
        return 1.0
    warm = int(cfg.warmup * cfg.steps)
    if step < warm:
        return (step + 1) / warm
    span = max(cfg.steps - warm, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / span))


@dataclass
class TrainConfig:
    steps: int = 200
    lr: float = 5e-3
    weight_decay: float = 0.0
    load_balance: float = 0.01  # weight of the load-balance loss (stage 2)
    distinctness: float = 0.01  # weight of the expert distinctness loss (stage 2)
    save_every: int = 50
    seed: int = 0
    progress: bool = True
    # when the output is not a terminal (a log file, CI), a line every this many steps: step,
    # loss, learning rate, tokens/s (0: none). On a terminal the progress bar shows them.
    log_every: int = 10
    router_lr_scale: float = 1.0  # the routers' learning rate is lr times this
    # learning-rate schedule over the run: "constant", or "cosine" (linear warm-up over the
    # first `warmup` fraction of the steps, then a cosine decay to 0). A function of the step
    # alone, so a resumed run follows it exactly.
    schedule: str = "constant"
    warmup: float = 0.0
    # several processes (torchrun): "ddp" (DistributedDataParallel) or "fsdp" (FSDP2,
    # fully_shard); the user bank is sharded by user either way (proper.train.distributed)
    parallel: str = "ddp"
    # "bf16": FSDP computes with bf16 copies of the sharded weights and reduces gradients in
    # fp32; otherwise the forward runs under torch.autocast(bf16). The adapters stay fp32.
    mixed_precision: Optional[str] = None


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, Tensor):
                if hasattr(value, "to_local"):  # FSDP: this rank's part (checkpoints are per rank)
                    value = value.to_local()
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    params = [p for group in opt.param_groups for p in group["params"]]
    for idx, st in state.items():
        p = params[idx]
        if hasattr(p, "device_mesh"):  # FSDP: the saved parts become this rank's shards again
            from torch.distributed.tensor import DTensor

            for name, value in st.items():
                if isinstance(value, Tensor) and tuple(value.shape) == tuple(p.to_local().shape):
                    st[name] = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements,
                                                  shape=p.shape, stride=p.stride(), run_check=False)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_tensors() -> dict[str, Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def _restore_rng(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


class CheckpointError(ValueError):
    """A training checkpoint that is corrupt, or a `latest` pointer that names no checkpoint."""


TRAINER_FORMAT = "proper.train.trainer/1"
_CHECKPOINT_NAME = re.compile(r"step-\d{7}")


def _trainer_text(body: dict) -> str:
    return json.dumps(body, indent=2, sort_keys=True) + "\n"


def save_checkpoint(ckpt_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, losses: list) -> Path:
    """Write checkpoint `step` and make it the latest. The one it replaces as the latest is
    kept (the fallback should this one be found corrupt); older ones are removed after.

    Durability: every file of the new checkpoint is fsynced, then its directory; the rename
    into place is fsynced through the parent directory before `latest` points at it
    (written and fsynced the same way). trainer.safetensors and trainer.json carry one
    SHA-256 digest of both, as the adapter files do."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".step-{step:07d}.tmp"
    for stale in ckpt_dir.glob(".step-*.tmp"):  # one writer per directory: these are killed saves'
        shutil.rmtree(stale, ignore_errors=True)
    if is_patched(model) and bank_shard(model) is not None:
        distributed.save_shard(model, tmp / "adapters")
    else:
        save_adapters(model, tmp / "adapters")
    tensors, meta = _optimizer_tensors(opt)
    tensors.update(_rng_tensors())
    body = {"step": step, "losses": losses, "optimizer": meta}
    digest = _digest(tensors, _trainer_text(body))
    save_file(tensors, str(tmp / "trainer.safetensors"), metadata={"format": TRAINER_FORMAT, "sha256": digest})
    (tmp / "trainer.json").write_text(_trainer_text({**body, "sha256": digest}), encoding="utf-8")
    fsync_tree(tmp)
    try:
        previous = latest_checkpoint(ckpt_dir)
    except CheckpointError:
        previous = None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(ckpt_dir)
    _write_json(ckpt_dir / LATEST, {"checkpoint": final.name})
    keep = {final.name, previous.name if previous is not None else None}
    for old in ckpt_dir.glob("step-*"):
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The checkpoint `latest` points at (None: no pointer, or it names a directory that is
    gone). The pointer may only name a checkpoint of this directory (step-NNNNNNN)."""
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer} is not a checkpoint pointer ({type(e).__name__}: {e})") from None
    if not isinstance(name, str) or not _CHECKPOINT_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint of {ckpt_dir} "
                              "(it must be a step-NNNNNNN directory inside it)")
    path = ckpt_dir / name
    return path if path.is_dir() else None


def read_checkpoint(ckpt: Path) -> tuple[dict[str, Tensor], dict]:
    """(trainer tensors, trainer.json body) of a checkpoint, after its checksums (its adapters'
    included) are verified; CheckpointError names the file that fails."""
    from ..io import AdapterFileError, _read, read_safetensors

    weights, meta_file = ckpt / "trainer.safetensors", ckpt / "trainer.json"
    metadata, tensors = read_safetensors(weights, CheckpointError)
    try:
        body = json.loads(meta_file.read_text(encoding="utf-8"))
        digest = body.pop("sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{meta_file} is not a trainer state file: {type(e).__name__}: {e}") from None
    if metadata.get("format") != TRAINER_FORMAT:
        raise CheckpointError(f"{weights} is not a proper trainer state file (format {metadata.get('format')!r})")
    if metadata.get("sha256") != digest or _digest(tensors, _trainer_text(body)) != digest:
        raise CheckpointError(f"{ckpt} failed its checksum: trainer.safetensors or trainer.json is corrupt")
    try:
        _read(ckpt / "adapters")
    except AdapterFileError as e:
        raise CheckpointError(f"{ckpt}: {e}") from None
    return tensors, body


def _verified_latest(ckpt_dir: Path) -> Optional[tuple[Path, dict[str, Tensor], dict]]:
    """The latest checkpoint, verified; a corrupt one is refused with the name of the newest
    earlier checkpoint that is intact."""
    ckpt = latest_checkpoint(ckpt_dir)
    if ckpt is None:
        return None
    try:
        tensors, body = read_checkpoint(ckpt)
    except CheckpointError as e:
        intact = None
        for other in sorted(ckpt_dir.glob("step-*"), reverse=True):
            if other != ckpt and _CHECKPOINT_NAME.fullmatch(other.name):
                try:
                    read_checkpoint(other)
                    intact = other
                    break
                except CheckpointError:
                    continue
        hint = (f"the earlier checkpoint {intact} is intact: to resume from it, write "
                f'{{"checkpoint": "{intact.name}"}} to {ckpt_dir / LATEST}' if intact is not None else
                "no earlier checkpoint in that directory is intact")
        raise CheckpointError(f"refusing to resume from a corrupt checkpoint: {e}; {hint}") from None
    return ckpt, tensors, body


def _check_world(ckpt_root: Path, world_size: int) -> None:
    """Refuse to start afresh beside checkpoints of another number of processes (they would
    be ignored): resume with that number, or reshard (proper.train.distributed).

    Checkpoints of this number of processes, any rank's, count as this run's: a rank must
    not wait for another rank's write (rank 0 may still be saving when rank 1 resumes)."""
    written = sorted(d.name for d in ckpt_root.glob("rank-*-of-*") if latest_checkpoint(d) is not None)
    if world_size > 1 and latest_checkpoint(ckpt_root) is not None:
        written.append("one process")
    ours = world_size > 1 and any(n.endswith(f"-of-{world_size}") for n in written)
    if written and not ours:
        raise RuntimeError(
            f"{ckpt_root} holds checkpoints of another number of processes ({', '.join(written)}), not of "
            f"{world_size}: resume with that number of processes, or start in a new directory"
        )


def train(
    model: nn.Module,
    batch_at: Callable[[int], dict],
    cfg: TrainConfig,
    ckpt_dir: Optional[Path] = None,
    *,
    trainable: Optional[Callable[[str], bool]] = None,
    on_step: Optional[Callable[[int, float], None]] = None,
    desc: str = "train",
) -> list[float]:
    """Train the adapters of a patched model for cfg.steps steps; returns the loss per step.

    batch_at(step) -> dict of model inputs plus "user_rows" (LongTensor, one per sequence).
    trainable(name) picks which adapter parameters train (default: all that require grad);
    the others are frozen for this run. With `ckpt_dir`, resumes from its latest checkpoint.

    Under torchrun / accelerate (a process group with several ranks) this trains as
    ``proper.train.distributed`` describes, and leaves `model` holding this rank's shard of the user
    bank (save it with ``proper.train.distributed.save_shard``) and, with ``parallel="fsdp"``,
    sharded by FSDP.
    """
    from tqdm.auto import tqdm

    rank, world_size = distributed.world()
    if cfg.parallel not in PARALLEL:
        raise ValueError(f"TrainConfig.parallel must be one of {PARALLEL}, got {cfg.parallel!r}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if not 0.0 <= cfg.warmup < 1.0:
        raise ValueError(f"TrainConfig.warmup must be in [0, 1), got {cfg.warmup!r}")
    if cfg.mixed_precision not in (None, *distributed.MIXED_PRECISION):
        raise ValueError(f"TrainConfig.mixed_precision must be None or one of {sorted(distributed.MIXED_PRECISION)}, "
                         f"got {cfg.mixed_precision!r}")
    if ckpt_dir is not None:
        _check_world(Path(ckpt_dir), world_size)  # before anything changes the model
    if world_size > 1 and is_patched(model) and any(l.user_A is not None for l in proper_layers(model).values()):
        distributed.shard_bank(model, rank, world_size)  # before the optimizer sees the bank
    sharded = is_patched(model) and bank_shard(model) is not None
    if trainable is not None:
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.requires_grad_(trainable(n))
    forward, replicated = model, []
    if world_size > 1:  # torchrun: the bank sharded by user, DDP or FSDP over the rest (proper.train.distributed)
        if cfg.parallel == "fsdp":  # before the optimizer: FSDP replaces the parameters
            replicated = distributed.wrap_fsdp(model, cfg.mixed_precision)
        else:
            forward = distributed.wrap(model)
            replicated = distributed.user_routers(model)
        if ckpt_dir is not None:
            ckpt_dir = Path(ckpt_dir) / f"rank-{rank}-of-{world_size}"
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("nothing to train: no adapter parameter is trainable")
    routers = [p for n, p in named if n.rsplit(".", 1)[-1].startswith("router_")]
    others = [p for n, p in named if not n.rsplit(".", 1)[-1].startswith("router_")]
    groups = [{"params": others}] if others else []
    if routers:
        groups.append({"params": routers, "lr": cfg.lr * cfg.router_lr_scale})
    sparse = is_patched(model) and any(layer.sparse_user_grad for layer in proper_layers(model).values())
    # sparse user-bank gradients: optimizer state only for the users seen (proper.optim)
    opt = (LazyAdamW if sparse else torch.optim.AdamW)(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    base_lrs = [group["lr"] for group in opt.param_groups]  # before a checkpoint's scheduled ones load
    start, losses = 0, []
    if ckpt_dir is not None:
        found = _verified_latest(Path(ckpt_dir))
        if found is not None:
            ckpt, tensors, meta = found
            (distributed.load_shard if sharded else load_adapters)(model, ckpt / "adapters")
            _load_optimizer(opt, tensors, meta["optimizer"])
            _restore_rng(tensors)
            start, losses = meta["step"], meta["losses"]
    fsdp = world_size > 1 and cfg.parallel == "fsdp"
    device = next(model.parameters()).device
    # mixed precision: FSDP's policy, else autocast (the adapters' parameters stay float32)
    autocast = (torch.autocast(device.type, dtype=distributed.MIXED_PRECISION[cfg.mixed_precision])
                if cfg.mixed_precision and not fsdp else contextlib.nullcontext())
    model.train()
    # disable=None: bars on a terminal only, not in logs and CI output
    bar = tqdm(range(start, cfg.steps), desc=desc, disable=None if cfg.progress else True, initial=start,
               total=cfg.steps)
    log_lines = cfg.progress and cfg.log_every > 0 and not sys.stderr.isatty() and rank == 0
    tokens, t_last = 0, time.perf_counter()
    for step in bar:
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * lr_factor(cfg, step)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch_at(step).items()}
        if world_size > 1:
            batch, n_global = distributed.local_batch(batch, rank, world_size)
            users, labels = batch.pop("user_rows"), batch.pop("labels")
            with user_context(model, users), autocast:
                logits = forward(**batch).logits
            loss = distributed.token_nll_sum(logits, labels) / n_global
            shown = loss.detach().clone()
            torch.distributed.all_reduce(shown)  # the global mean, for the log
        else:
            users = batch.pop("user_rows")
            with user_context(model, users), autocast:
                out = model(**batch)
            loss = shown = out.loss
        if cfg.load_balance or cfg.distinctness:
            aux = aux_losses(model, reduce=distributed.all_reduce_sum if world_size > 1 else None)
            # several ranks: gradients are summed. Every rank computes the same global load
            # balance (routing statistics all-reduced, whose backward sums the ranks' upstream
            # gradients) and adds 1/world of it; under DDP 1/world of the distinctness loss too
            # (a function of the shared weights). Under FSDP each rank reads the sharded weights
            # whole and its gradient lands on its own shard: the whole loss, once.
            loss = (loss + cfg.load_balance * aux["load_balance"] / world_size
                    + cfg.distinctness * aux["distinctness"] / (1 if fsdp else world_size))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: the loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.sum_grads(replicated, sparse)  # the user routers, which every rank holds whole
        opt.step()
        losses.append(shown.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if log_lines:
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                now = time.perf_counter()
                print(f"{desc}: step {step + 1}/{cfg.steps} loss {losses[-1]:.4f} lr {opt.param_groups[0]['lr']:.3g} "
                      f"{tokens / max(now - t_last, 1e-9):.0f} tokens/s", file=sys.stderr, flush=True)
                tokens, t_last = 0, now
        if on_step is not None:
            on_step(step, losses[-1])
        done = step + 1
        if ckpt_dir is not None and (done % cfg.save_every == 0 or done == cfg.steps):
            save_checkpoint(Path(ckpt_dir), model, opt, done, losses)
    model.eval()
    return losses
