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
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..config import ProperConfig
from ..io import SHARED_ROUTER_KEY, _read, load_adapters, save_adapters
from . import distributed
from .data import Encoded
# the stage-2 steps (expert_losses, split_merge_move, ...) live in grouping; stages re-exports them
from .grouping import (  # noqa: F401
    FORCE_LOGIT,
    record_rows,
    user_routers,
    assign_groups,
    expert_losses,
    initial_groups,
    recent_records,
    set_assignment,
    split_merge_move,
)
from ..patching import merge_and_unload, patch_model, proper_layers
from .plots import plot_losses, plot_routing
from .trainer import TrainConfig, latest_checkpoint, train

STAGES = (1, 2, 3)
GROUP_INITS = ("features", "random")


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
        merge_and_unload(model)
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

def assignment_steps(steps: int, count: int, until: float) -> set[int]:
    """The steps (1-based) after which a hard assignment runs: `count` of them, evenly spaced
    over the first `until` of `steps` steps (fewer if that span is shorter)."""
    span = int(until * steps)
    count = min(count, span)
    return {round(span * (i + 1) / count) for i in range(count)} if count > 0 else set()


def _initial_assignment(model: nn.Module, records: Sequence[Encoded], pad_id: int, cfg: "PipelineConfig",
                        seed: int) -> None:
    E = user_routers(model)[0].shape[1]
    if cfg.group_init == "features":
        rows, experts = initial_groups(model, records, pad_id, cfg.num_users, E, seed=seed)
    else:
        rows = record_rows(records)
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
