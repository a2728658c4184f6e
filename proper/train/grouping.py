"""Stage 2's first assignment of users to experts, from the data instead of at random.

A user's feature is a sketch of the gradient their records put on the output layer of the
model stage 2 starts from (the base with stage 1 merged): for every target token t,

    (p_t - onehot(y_t)) (x)  h_t        p_t the next-token distribution, h_t the last hidden state

summed over the user's records and divided by their number, seen through two fixed random
projections (vocabulary -> `dims[0]`, hidden -> `dims[1]`). Those are the directions in
which each user would pull the population model. Users of one group pull the same way on
the prompts they share, so the first assignment is weighted k-means++ over these
features. The features are centred, scaled to unit length, and weighted by the user's
number of records. Several starts are run, and the one with the lowest inertia wins. It
costs one forward pass over each user's recent records, and no backward pass.

This start is not the final grouping. It is good on the users with many records, who
dominate training, and the hard assignment steps then place the rest by likelihood.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .data import Encoded, pad_encoded
from ..patching import is_patched, user_context


@torch.no_grad()
def user_features(model: nn.Module, records: Sequence[Encoded], pad_id: int, num_users: int,
                  dims: tuple[int, int] = (32, 16), seed: int = 0, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """(features [num_users, dims[0] * dims[1]] float64, records per user [num_users]): the
    mean output-layer gradient sketch of each user's `records` (zero for a user without any).
    `model` is a Hugging Face causal LM (patched or not; it runs as it is, in eval mode)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("the model has no output embeddings (get_output_embeddings() is None)")
    vocab, hidden = head.weight.shape
    g = torch.Generator().manual_seed(seed)
    p_vocab = torch.randn(vocab, dims[0], generator=g, dtype=torch.float64) / math.sqrt(dims[0])
    p_hidden = torch.randn(hidden, dims[1], generator=g, dtype=torch.float64) / math.sqrt(dims[1])
    device = head.weight.device
    acc = torch.promote_types(head.weight.dtype, torch.float32)  # float32, or float64 for a float64 model
    p_vocab, p_hidden = p_vocab.to(device, acc), p_hidden.to(device, acc)
    feats = torch.zeros(num_users, dims[0] * dims[1], dtype=torch.float64)
    counts = torch.zeros(num_users, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(records), batch_size):
            batch = pad_encoded(records[i:i + batch_size], pad_id)
            rows, labels = batch.pop("user_rows"), batch.pop("labels").to(device)
            inputs = {k: v.to(device) for k, v in batch.items()}
            if is_patched(model):
                with user_context(model, rows.to(device)):
                    out = model(**inputs, output_hidden_states=True)
            else:
                out = model(**inputs, output_hidden_states=True)
            target = labels[:, 1:]
            sel = target != -100  # only the target positions: [n, vocab] rather than [B, T, vocab]
            seq = sel.nonzero()[:, 0]
            pull = out.logits[:, :-1][sel].to(acc).softmax(-1) @ p_vocab - p_vocab[target[sel]]  # [n, dims[0]]
            h = out.hidden_states[-1][:, :-1][sel].to(acc) @ p_hidden  # [n, dims[1]]
            f = torch.zeros(len(rows), dims[0] * dims[1], dtype=acc, device=device)
            f.index_add_(0, seq, (pull[:, :, None] * h[:, None, :]).reshape(len(seq), -1))
            feats.index_add_(0, rows, f.double().cpu())
            counts.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
    finally:
        model.train(was_training)
    seen = counts > 0
    feats[seen] /= counts[seen, None]
    return feats, counts


def kmeans(x: Tensor, k: int, weights: Tensor | None = None, starts: int = 10, iters: int = 100,
           seed: int = 0) -> tuple[Tensor, float]:
    """Weighted k-means with k-means++ seeding: (cluster per row [n] long, inertia) of the
    start with the lowest weighted inertia out of `starts`. A cluster that empties keeps its
    centre."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of rows), got {k}")
    x = x.double()
    w = torch.ones(n, dtype=torch.float64) if weights is None else weights.double()
    g = torch.Generator().manual_seed(seed)
    best: tuple[float, Tensor] | None = None
    for _ in range(starts):
        centres = x[torch.multinomial(w, 1, generator=g)]
        for _ in range(1, k):
            d2 = torch.cdist(x, centres).pow(2).min(1).values * w
            pick = torch.multinomial(d2, 1, generator=g) if d2.sum() > 0 else torch.multinomial(w, 1, generator=g)
            centres = torch.cat([centres, x[pick]])
        assign = torch.cdist(x, centres).argmin(1)
        for _ in range(iters):
            mass = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, w)
            sums = torch.zeros_like(centres).index_add_(0, assign, x * w[:, None])
            centres = torch.where(mass[:, None] > 0, sums / mass.clamp(min=1e-300)[:, None], centres)
            new = torch.cdist(x, centres).argmin(1)
            if torch.equal(new, assign):
                break
            assign = new
        inertia = float((torch.cdist(x, centres).pow(2).min(1).values * w).sum())
        if best is None or inertia < best[0]:
            best = (inertia, assign)
    return best[1], best[0]


def initial_groups(model: nn.Module, records: Sequence[Encoded], pad_id: int, num_users: int, k: int,
                   seed: int = 0, starts: int = 10) -> tuple[Tensor, Tensor]:
    """(bank rows of the users with records [n], their group in [0, k) [n]): weighted
    k-means++ over the users' centred, unit-length gradient sketches (module docstring)."""
    feats, counts = user_features(model, records, pad_id, num_users, seed=seed)
    rows = (counts > 0).nonzero().squeeze(1)
    if len(rows) == 0:
        raise ValueError("no user has a record: nothing to group")
    x, w = feats[rows], counts[rows]
    x = x - (x * w[:, None]).sum(0) / w.sum()
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    groups, _ = kmeans(x, min(k, len(rows)), w, starts=starts, seed=seed)
    return rows, groups
