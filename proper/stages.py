"""The three PROPER stages on any Hugging Face causal LM, each resumable.

  stage 1  population: one LoRA (one expert, no router) on every user's data; then merged
           into the base weights, as the starting point of the next stages.
  stage 2  group: E LoRA experts with the user-aware router (R[u]; optionally the token
           router), trained with the load-balance and expert-distinctness losses.
  stage 3  user: every user's LoRA in the bank plus the LoRA-aware router (W_h h_u), all
           users at once in mixed-user batches; the group experts and R stay as stage 2
           left them (frozen).

A stage's directory holds ``checkpoints/`` (resumable training state) and, once done,
``final/`` (its adapters, ``save_adapters`` format), ``loss.png`` and, for stages 2 and 3,
``routing.png`` (the users x experts heat map of the user-aware router). A later stage rebuilds its starting
point from the earlier stages' ``final/`` directories, so each stage resumes from the
previous stage's checkpoint and a finished stage is never trained again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from .config import ProperConfig
from .io import _read, load_adapters, save_adapters
from .patching import merge, patch_model, proper_layers
from .plots import plot_losses, plot_routing
from .trainer import TrainConfig, train

STAGES = (1, 2, 3)


@dataclass
class PipelineConfig:
    """Sizes of the three stages (the paper's defaults scaled to the model at hand)."""

    num_users: int
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    population_rank: int = 8
    population_alpha: float = 16.0
    num_experts: int = 4
    top_k: int = 2
    rank: int = 8
    alpha: float = 16.0
    user_rank: int = 4
    user_alpha: float = 8.0
    token_router: bool = False  # stage 2 routes on the user alone (PROPER); True adds W_x x
    temperature: float = 1.0  # router softmax temperature of stages 2 and 3
    train: dict[int, TrainConfig] = field(default_factory=lambda: {s: TrainConfig() for s in STAGES})

    def stage_config(self, stage: int) -> ProperConfig:
        common = dict(target_modules=tuple(self.target_modules), dropout=0.0)
        if stage == 1:
            return ProperConfig(num_experts=1, top_k=1, rank=self.population_rank, alpha=self.population_alpha,
                                user_rank=0, num_users=self.num_users, router=(), **common)
        router = ("token", "user") if self.token_router else ("user",)
        group = dict(num_experts=self.num_experts, top_k=self.top_k, rank=self.rank, alpha=self.alpha,
                     num_users=self.num_users, temperature=self.temperature, **common)
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


def _trainable(stage: int) -> Optional[Callable[[str], bool]]:
    if stage == 3:  # the user bank and the LoRA-aware router; the group level stays fixed
        return lambda name: name.endswith(("user_A", "user_B", "router_h"))
    return None


def run_stage(build_base: Callable[[], nn.Module], batch_at: Callable[[int], dict], out: Path,
              cfg: PipelineConfig, stage: int) -> list[float]:
    """Train one stage (resuming its checkpoint) and save its final adapters."""
    for earlier in range(1, stage):
        if not is_done(out, earlier):
            raise RuntimeError(f"stage {stage} needs stage {earlier} first (no {stage_dir(out, earlier) / 'final'})")
    if is_done(out, stage):
        return []
    model = build_stage_model(build_base, out, cfg, stage)
    tcfg = cfg.train[stage]
    if stage != 2:
        tcfg = TrainConfig(**{**tcfg.__dict__, "load_balance": 0.0, "distinctness": 0.0})
    losses = train(model, batch_at, tcfg, stage_dir(out, stage) / "checkpoints", trainable=_trainable(stage),
                   desc=f"stage {stage}")
    plot_losses(losses, stage_dir(out, stage) / "loss.png", f"stage {stage} loss")
    if stage >= 2:
        plot_routing(model, stage_dir(out, stage) / "routing.png")
    save_adapters(model, stage_dir(out, stage) / "final")
    return losses
