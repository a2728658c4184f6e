"""The three PROPER stages on any Hugging Face causal LM, each resumable.

  stage 1  population: one LoRA (one expert, no router) on every user's data; then merged
           into the base weights, as the starting point of the next stages.
  stage 2  group: E LoRA experts with the user-aware router (R[u]; optionally the token
           router), trained with the load-balance and expert-distinctness losses, on
           batches drawn uniformly over records. One router table serves every layer, so a
           user's group is one expert index. Finding the groups is a clustering problem,
           and gradient descent on R is a poor way to solve it: R learns a per-user code
           spread over experts instead of a group, and at top_k=1 the gate is 1 and R gets
           no gradient at all. So R is set by hard assignment (hard EM, as in clustered
           federated learning / IFCA), in three parts:
             - the start: every user with records is put in a group by weighted k-means++
               over sketches of the gradients their records put on the stage-2 starting
               model (``proper.train.grouping``; ``group_init="features"``; "random" draws it).
               It depends on the data, so a change of float rounding barely moves it. It is
               reliable for users with many records, who dominate training, and the
               assignments below place the others;
             - ``group_assignments`` assignment steps, evenly spaced over the first
               ``group_assign_until`` of the stage (a fraction, so a short stage gets them
               too): each user moves to the expert under which their own recent records are
               most likely, R[u] = strength * one_hot(expert);
             - split-and-merge moves (``group_split_merge``; :func:`split_merge_move`),
               which repair hard EM's usual dead end: two experts serve one group while a
               third holds two. Without them, 4 of 10 single-start demo runs (seeds 0-4,
               torch's AVX-512 and AVX2 kernels) ended there with an ARI below 0.75, from
               the k-means start and from a random one alike.
           ``group_restarts > 1`` tries several starts (k-means seeds, expert
           initialisations) for ``group_restart_steps`` steps each and keeps the one with
           the lowest loss. It guards against an expert stuck in a poor solution, which
           split-and-merge does not see (on the demo's seed 4, with one start, an expert
           with the right users got only 2 of 3 answers right). Between assignments and
           after them, R also trains by gradient.
  stage 3  user: every user's LoRA in the bank plus the LoRA-aware router (W_h h_u), all
           users at once in mixed-user batches; the group experts and R stay as stage 2
           left them (frozen).

A stage's directory holds ``checkpoints/`` (resumable training state) and, once done,
``final/`` (its adapters, ``save_adapters`` format), ``loss.png`` and, for stages 2 and 3,
``routing.png`` (the users x experts heat map of the user-aware router). A later stage rebuilds its starting
point from the earlier stages' ``final/`` directories, so each stage resumes from the
previous stage's checkpoint and a finished stage is never trained again.

Design: docs/DESIGN.md#pipeline (the pipeline (stage 2's grouping: #pipeline-stage2)).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..config import ProperConfig
from ..io import SHARED_ROUTER_KEY, _read, load_adapters, save_adapters
from . import distributed
from .data import Encoded, pad_encoded
from .grouping import initial_groups
from ..patching import merge, patch_model, proper_layers, user_context
from .plots import plot_losses, plot_routing
from .trainer import TrainConfig, latest_checkpoint, train

STAGES = (1, 2, 3)
GROUP_INITS = ("features", "random")
FORCE_LOGIT = 30.0  # a router logit that puts (nearly) all of a token's gate on one expert


@dataclass
class PipelineConfig:
    """Sizes of the three stages.

    The layer's sizes and scalings default to ProperConfig's, which states them once:
    stage 1's LoRA takes its rank and alpha, stage 2 its experts, top-k, rank, alpha and
    temperature, stage 3 its user rank and user alpha. The CLI reads these fields in turn.
    """

    num_users: int
    target_modules: tuple[str, ...] = ProperConfig.target_modules
    population_rank: int = ProperConfig.rank
    population_alpha: float = ProperConfig.alpha
    num_experts: int = ProperConfig.num_experts
    top_k: int = ProperConfig.top_k
    rank: int = ProperConfig.rank
    alpha: float = ProperConfig.alpha
    user_rank: int = ProperConfig.user_rank
    user_alpha: float = ProperConfig.user_alpha
    token_router: bool = False  # stage 2 routes on the user alone (PROPER); True adds W_x x
    temperature: float = ProperConfig.temperature  # router softmax temperature of stages 2 and 3
    share_user_router: bool = True  # one R for all layers: a user's group is one expert index
    group_init: str = "features"  # stage 2's first assignment: "features" (k-means++, proper.train.grouping) | "random"
    group_assignments: int = 8  # stage 2 hard assignment steps (0: none; the router learns by gradient alone)
    group_assign_until: float = 0.75  # ... evenly spaced over this fraction of the stage-2 steps
    group_split_merge: bool = True  # assignment steps may split one expert and merge two (split_merge_move)
    group_assign_strength: float = 3.0  # R[u] = strength * one_hot(expert) after an assignment
    group_assign_records: int = 16  # the most recent records per user an assignment looks at
    group_restarts: int = 1  # random starts of the assignment tried, the lowest loss kept
    group_restart_steps: int = 200  # training steps given to each start
    train: dict[int, TrainConfig] = field(default_factory=lambda: {s: TrainConfig() for s in STAGES})

    def __post_init__(self) -> None:
        for name, low in (("group_assignments", 0), ("group_assign_records", 1), ("group_restarts", 1),
                          ("group_restart_steps", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"PipelineConfig.{name} must be an integer >= {low}, got {v!r}")
        if self.group_init not in GROUP_INITS:
            raise ValueError(f"PipelineConfig.group_init must be one of {GROUP_INITS}, got {self.group_init!r}")
        if not 0.0 <= self.group_assign_until <= 1.0:
            raise ValueError(f"PipelineConfig.group_assign_until must be in [0, 1], got {self.group_assign_until!r}")
        if not 0.0 < self.group_assign_strength < FORCE_LOGIT:
            raise ValueError(f"PipelineConfig.group_assign_strength must be in (0, {FORCE_LOGIT}), "
                             f"got {self.group_assign_strength!r}")

    def stage_config(self, stage: int) -> ProperConfig:
        common = dict(target_modules=tuple(self.target_modules))
        if stage == 1:
            return ProperConfig(num_experts=1, top_k=1, rank=self.population_rank, alpha=self.population_alpha,
                                user_rank=0, num_users=self.num_users, router=(), **common)
        router = ("token", "user") if self.token_router else ("user",)
        group = dict(num_experts=self.num_experts, top_k=self.top_k, rank=self.rank, alpha=self.alpha,
                     num_users=self.num_users, temperature=self.temperature,
                     share_user_router=self.share_user_router, **common)
        if stage == 2:
            return ProperConfig(user_rank=0, router=router, **group)
        if stage == 3:
            return ProperConfig(user_rank=self.user_rank, user_alpha=self.user_alpha, router=router + ("lora",),
                                **group)
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def stage_dir(out: Path, stage: int) -> Path:
    return Path(out) / f"stage{stage}"


def is_done(out: Path, stage: int) -> bool:
    return (stage_dir(out, stage) / "final" / "adapter_model.safetensors").is_file()


def _copy_matching(model: nn.Module, path: Path, names: tuple[str, ...]) -> None:
    """Copy the tensors `names` of every layer from adapters saved at `path` into `model`
    (whose config differs: stage 2 -> stage 3)."""
    _, tensors = _read(path)
    with torch.no_grad():
        for module, layer in proper_layers(model).items():
            for n in names:
                key = f"{module}.{n}"
                if key not in tensors and n == SHARED_ROUTER_KEY:
                    key = SHARED_ROUTER_KEY
                if key in tensors and getattr(layer, n) is not None:
                    getattr(layer, n).copy_(tensors[key])


def base_for_stage(build_base: Callable[[], nn.Module], out: Path, stage: int) -> nn.Module:
    """The unpatched model a stage builds on: the base, with stage 1's population LoRA merged
    into its weights for stages 2 and 3."""
    model = build_base()
    if stage >= 2:
        load_adapters(model, stage_dir(out, 1) / "final")
        merge(model)
    return model


def build_stage_model(build_base: Callable[[], nn.Module], out: Path, cfg: PipelineConfig, stage: int) -> nn.Module:
    """The model a stage starts from: the base, stage 1 merged in (for stages 2 and 3), and
    for stage 3 the group experts and routers of stage 2."""
    model = base_for_stage(build_base, out, stage)
    patch_model(model, cfg.stage_config(stage))
    if stage == 3:
        _copy_matching(model, stage_dir(out, 2) / "final", ("lora_A", "lora_B", "router_x", "router_user"))
        with torch.no_grad():  # W_h = 0 and B^u = 0: stage 3 starts exactly where stage 2 ended
            for layer in proper_layers(model).values():
                layer.router_h.zero_()
    return model


def load_stage(build_base: Callable[[], nn.Module], out: Path, stage: int) -> nn.Module:
    """A finished stage's model, for evaluation or generation."""
    return load_adapters(base_for_stage(build_base, out, stage), stage_dir(out, stage) / "final").eval()


# -- stage 2: hard assignment of users to experts ---------------------------------------------

def recent_records(records: Sequence[Encoded], per_user: int) -> list[Encoded]:
    """The last `per_user` records of every user (records are in time order per user)."""
    if per_user < 1:
        raise ValueError(f"per_user must be >= 1, got {per_user}")
    by_user: dict[int, list[Encoded]] = {}
    for r in records:
        by_user.setdefault(r.user_row, []).append(r)
    return [r for u in sorted(by_user) for r in by_user[u][-per_user:]]


def _record_rows(records: Sequence[Encoded]) -> Tensor:
    """The bank rows of the users that have records, sorted."""
    return torch.tensor(sorted({r.user_row for r in records}), dtype=torch.long)


def _user_routers(model: nn.Module) -> list[Tensor]:
    tables = {id(layer.router_user): layer.router_user for layer in proper_layers(model).values()
              if layer.router_user is not None}
    if not tables:
        raise ValueError("the model has no user-aware router (router must include 'user')")
    return list(tables.values())


@torch.no_grad()
def expert_losses(model: nn.Module, records: Sequence[Encoded], pad_id: int, batch_size: int = 64) -> Tensor:
    """[num_users, E] float64: the summed token NLL of each user's `records` with every layer's
    routing forced to one expert (a user without records: 0)."""
    tables = _user_routers(model)
    E, N = tables[0].shape[1], tables[0].shape[0] - 1
    out = torch.zeros(N, E, dtype=torch.float64)
    saved = [t.detach().clone() for t in tables]
    was_training = model.training
    model.eval()
    try:
        for e in range(E):
            for t in tables:
                t.zero_()
                t[:, e] = FORCE_LOGIT
            for i in range(0, len(records), batch_size):
                batch = pad_encoded(records[i:i + batch_size], pad_id)
                rows, labels = batch.pop("user_rows"), batch.pop("labels")
                device = tables[0].device
                with user_context(model, rows.to(device)):
                    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
                nll = distributed.sequence_nll(logits, labels.to(device))
                out[:, e].index_add_(0, rows, nll.double().cpu())
    finally:
        for t, s in zip(tables, saved):
            t.copy_(s)
        model.train(was_training)
    return out


@torch.no_grad()
def set_assignment(model: nn.Module, rows: Tensor, experts: Tensor, strength: float) -> None:
    """R[rows] = strength * one_hot(experts) in every user-aware router of the model."""
    for t in _user_routers(model):
        t[rows.to(t.device)] = 0.0
        t[rows.to(t.device), experts.to(t.device)] = strength


class Assignment(NamedTuple):
    experts: Tensor  # [num_users] the expert of each user, -1 for a user without records
    nll: float  # the total NLL of the records under the likeliest experts (before any move)


def assign_groups(model: nn.Module, records: Sequence[Encoded], pad_id: int, strength: float,
                  split_merge: bool = False, seed: int = 0) -> Assignment:
    """One hard assignment step: route every user with records to the expert under which those
    records are most likely (with `split_merge`, after a split-and-merge move when one pays:
    :func:`split_merge_move`)."""
    losses = expert_losses(model, records, pad_id)
    rows = _record_rows(records)
    best = losses[rows].min(-1)
    experts = best.indices
    if split_merge:
        experts = split_merge_move(model, records, pad_id, losses, rows, experts, seed)
    set_assignment(model, rows, experts, strength)
    out = torch.full((losses.shape[0],), -1, dtype=torch.long)
    out[rows] = experts
    return Assignment(out, float(best.values.sum()))


def split_merge_move(model: nn.Module, records: Sequence[Encoded], pad_id: int, losses: Tensor, rows: Tensor,
                     experts: Tensor, seed: int = 0) -> Tensor:
    """Hard EM's usual dead end, repaired (split-and-merge EM, Ueda et al. 2000): two experts
    serve one group while a third holds two. Let L[u, e] be user u's NLL under expert e.

    - merge: the pair (i, j) whose users lose least, per record, when one side joins the
      other (a starved expert, with no user, costs nothing);
    - split: the expert s whose users have the highest NLL in all (a mixture of groups is
      big and fits neither). Its excess is its NLL per record minus the other experts' mean.

    When the merge costs less than a third of the split's excess per record, the merged
    side's expert is freed and takes a copy of s's weights and part of s's users: one
    cluster of a 2-means over their gradient sketches under s (``proper.train.grouping``), where
    two groups pull in opposite directions. Training and the later assignment steps then
    settle the users.
    Returns the (possibly new) expert of each of `rows`; `model` changes only if a move is
    made."""
    E = losses.shape[1]
    if E < 3:
        return experts
    n_rec = torch.zeros(losses.shape[0], dtype=torch.float64)
    for r in records:
        n_rec[r.user_row] += 1
    L, w = losses[rows], n_rec[rows]
    own = L.gather(1, experts[:, None]).squeeze(1)
    mass = torch.zeros(E, dtype=torch.float64).index_add_(0, experts, w)
    nll = torch.zeros(E, dtype=torch.float64).index_add_(0, experts, own)
    per_record = torch.where(mass > 0, nll / mass.clamp(min=1), torch.zeros_like(nll))
    split = int(nll.argmax())
    others = [e for e in range(E) if e != split and mass[e] > 0]
    if not others or (experts == split).sum() < 2:
        return experts
    excess = float(per_record[split] - per_record[others].mean())
    best_cost, freed, into = float("inf"), -1, -1
    for i in range(E):
        for j in range(E):
            if split in (i, j) or i == j:
                continue
            moved = experts == j  # j's users join i, j is freed
            cost = float((L[moved, i] - L[moved, j]).sum()) / max(float(mass[i] + mass[j]), 1.0)
            if cost < best_cost:
                best_cost, freed, into = cost, j, i
    if freed < 0 or not best_cost < excess / 3:
        return experts
    mine_rows = set(rows[experts == split].tolist())
    halves_rows, halves = initial_groups(model, [r for r in records if r.user_row in mine_rows], pad_id,
                                         losses.shape[0], 2, seed=seed)
    if halves.unique().numel() < 2:
        return experts
    experts = experts.clone()
    experts[experts == freed] = into
    position = {int(r): i for i, r in enumerate(rows.tolist())}
    for r, h in zip(halves_rows.tolist(), halves.tolist()):
        if h == 1:
            experts[position[r]] = freed
    with torch.no_grad():
        for layer in proper_layers(model).values():
            for t in (layer.lora_A, layer.lora_B, layer.router_x):
                if t is None:
                    continue
                if hasattr(t, "full_tensor"):  # sharded by FSDP: every rank edits the whole, keeps its part
                    from torch.distributed.tensor import distribute_tensor

                    full = t.full_tensor()
                    full[freed] = full[split]
                    # src_data_rank=None: each rank cuts its part from its own (equal) copy, no broadcast
                    t.copy_(distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None))
                else:
                    t[freed] = t[split]
    return experts


def assignment_steps(steps: int, count: int, until: float) -> set[int]:
    """The steps (1-based) after which a hard assignment runs: `count` of them, evenly spaced
    over the first `until` of `steps` steps (fewer if that span is shorter)."""
    span = int(until * steps)
    count = min(count, span)
    return {round(span * (i + 1) / count) for i in range(count)} if count > 0 else set()


def _initial_assignment(model: nn.Module, records: Sequence[Encoded], pad_id: int, cfg: "PipelineConfig",
                        seed: int) -> None:
    E = _user_routers(model)[0].shape[1]
    if cfg.group_init == "features":
        rows, experts = initial_groups(model, records, pad_id, cfg.num_users, E, seed=seed)
    else:
        rows = _record_rows(records)
        experts = torch.randint(0, E, (len(rows),), generator=torch.Generator().manual_seed(seed))
    set_assignment(model, rows, experts, cfg.group_assign_strength)


def _assign_hook(model, records, pad_id, cfg: "PipelineConfig", steps: int):
    at = assignment_steps(steps, cfg.group_assignments, cfg.group_assign_until)

    # moves at every other assignment of the first half only (the 1st and 3rd of 8): the
    # experts need training between a move and the assignments that judge it. A function of
    # the step alone, so a resumed stage makes the moves an uninterrupted one makes.
    movable = set(sorted(at)[: len(at) // 2 : 2])

    def on_step(step: int, loss: float) -> None:
        if step + 1 in at:
            assign_groups(model, records, pad_id, cfg.group_assign_strength,
                          split_merge=cfg.group_split_merge and step + 1 in movable, seed=step)

    return on_step


def _stage2_start(build_base, batch_at, out: Path, cfg: "PipelineConfig", tcfg: TrainConfig,
                  records: Sequence[Encoded], pad_id: int) -> nn.Module:
    """The stage-2 model to train: its first assignment, or the best of several starts."""
    best, best_loss = None, float("inf")
    for r in range(cfg.group_restarts):
        torch.manual_seed(tcfg.seed * 7919 + r)  # each start has its own expert initialisation
        model = build_stage_model(build_base, out, cfg, 2)
        _initial_assignment(model, records, pad_id, cfg, tcfg.seed * 7919 + r)
        if cfg.group_restarts == 1:
            return model
        short = replace(tcfg, steps=cfg.group_restart_steps)
        train(model, batch_at, short, None, on_step=_assign_hook(model, records, pad_id, cfg, short.steps),
              desc=f"stage 2 start {r + 1}/{cfg.group_restarts}")
        loss = assign_groups(model, records, pad_id, cfg.group_assign_strength).nll
        if loss < best_loss:
            best, best_loss = model, loss
    return best


def _trainable(stage: int) -> Optional[Callable[[str], bool]]:
    if stage == 3:  # the user bank and the LoRA-aware router; the group level stays fixed
        return lambda name: name.endswith(("user_A", "user_B", "router_h"))
    return None


def run_stage(build_base: Callable[[], nn.Module], batch_at: Callable[[int], dict], out: Path,
              cfg: PipelineConfig, stage: int, *, records: Optional[Sequence[Encoded]] = None,
              pad_id: Optional[int] = None) -> list[float]:
    """Train one stage (resuming its checkpoint) and save its final adapters.

    ``records``/``pad_id`` (the encoded training split and the pad token id) are needed by
    stage 2's assignment of users to groups (``cfg.group_assignments > 0``)."""
    for earlier in range(1, stage):
        if not is_done(out, earlier):
            raise RuntimeError(f"stage {stage} needs stage {earlier} first (no {stage_dir(out, earlier) / 'final'})")
    if is_done(out, stage):
        return []
    tcfg = cfg.train[stage]
    if stage != 2:
        tcfg = TrainConfig(**{**tcfg.__dict__, "load_balance": 0.0, "distinctness": 0.0})
    ckpt_dir = stage_dir(out, stage) / "checkpoints"
    on_step = None
    if stage == 2 and cfg.group_assignments > 0:
        if records is None or pad_id is None:
            raise ValueError("stage 2 assigns users to groups from their records: pass records= (the encoded "
                             "training split) and pad_id=, or set PipelineConfig.group_assignments=0")
        if not records:
            raise ValueError("records is empty: stage 2 has no training record to assign users by")
        records = recent_records([r for r in records if r.user_row >= 0], cfg.group_assign_records)
        if not records:
            raise ValueError("records holds no record of a known user: stage 2 cannot assign users to groups")
        if latest_checkpoint(ckpt_dir) is None:
            model = _stage2_start(build_base, batch_at, out, cfg, tcfg, records, pad_id)
        else:  # resuming: the checkpoint holds the assignment
            model = build_stage_model(build_base, out, cfg, stage)
        on_step = _assign_hook(model, records, pad_id, cfg, tcfg.steps)
    else:
        model = build_stage_model(build_base, out, cfg, stage)
    losses = train(model, batch_at, tcfg, ckpt_dir, trainable=_trainable(stage), on_step=on_step,
                   desc=f"stage {stage}")
    rank, world_size = distributed.world()
    final = stage_dir(out, stage) / "final"
    if world_size > 1:  # torchrun: every rank writes its shard, rank 0 merges them
        shards = [stage_dir(out, stage) / "shards" / f"rank-{r}-of-{world_size}" for r in range(world_size)]
        distributed.save_shard(model, shards[rank], rank, world_size)
        torch.distributed.barrier()
        if rank == 0:
            distributed.merge_shards(shards, final)
    if rank == 0:
        plot_losses(losses, stage_dir(out, stage) / "loss.png", f"stage {stage} loss")
        if stage >= 2:
            plot_routing(model, stage_dir(out, stage) / "routing.png")  # shared router: the same on every rank
        if world_size == 1:
            save_adapters(model, final)
    if world_size > 1:
        torch.distributed.barrier()
    return losses
