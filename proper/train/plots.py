"""Pictures written next to a stage's checkpoints: the loss curve and the routing heat map."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from .._fs import atomic_write
from ..patching import proper_layers


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_losses(losses: Sequence[float], path: Path, title: str = "training loss") -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


@torch.no_grad()
def plot_routing(model: nn.Module, path: Path, max_users: int = 200) -> Path:
    """Users x experts heat map of the user-aware router: each user's softmax over the
    experts, averaged over the layers (users sorted by their argmax expert)."""
    plt = _figure()
    tables = [layer.router_user.float() for layer in proper_layers(model).values() if layer.router_user is not None]
    if not tables:
        raise ValueError("the model has no user-aware router to plot")
    probs = torch.stack([torch.softmax(t[:-1], dim=-1) for t in tables]).mean(0)[:max_users]
    order = torch.argsort(probs.argmax(-1), stable=True)
    fig, ax = plt.subplots(figsize=(4, 6))
    im = ax.imshow(probs[order].cpu().numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("expert (group)")
    ax.set_ylabel(f"user (first {probs.shape[0]}, sorted by group)")
    ax.set_title("user-aware routing")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
