"""Finding stage 2's groups: the first assignment of users to experts, from the data
instead of at random (below), then the hard assignment steps and the split-and-merge move
that ``proper.train.stages`` runs during the stage (the end of this file).

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
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from . import distributed
from .data import Encoded, pad_encoded
from ..patching import is_patched, proper_layers, user_context


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


# Hard assignment (stage 2): each user to the expert under which their records are most
# likely, and the split-and-merge move that repairs hard EM's usual dead end.

FORCE_LOGIT = 30.0  # a router logit that puts (nearly) all of a token's gate on one expert


def recent_records(records: Sequence[Encoded], per_user: int) -> list[Encoded]:
    """The last `per_user` records of every user (records are in time order per user)."""
    if per_user < 1:
        raise ValueError(f"per_user must be >= 1, got {per_user}")
    by_user: dict[int, list[Encoded]] = {}
    for r in records:
        by_user.setdefault(r.user_row, []).append(r)
    return [r for u in sorted(by_user) for r in by_user[u][-per_user:]]


def record_rows(records: Sequence[Encoded]) -> Tensor:
    """The bank rows of the users that have records, sorted."""
    return torch.tensor(sorted({r.user_row for r in records}), dtype=torch.long)


def user_routers(model: nn.Module) -> list[Tensor]:
    tables = {id(layer.router_user): layer.router_user for layer in proper_layers(model).values()
              if layer.router_user is not None}
    if not tables:
        raise ValueError("the model has no user-aware router (router must include 'user')")
    return list(tables.values())


@torch.no_grad()
def expert_losses(model: nn.Module, records: Sequence[Encoded], pad_id: int, batch_size: int = 64) -> Tensor:
    """[num_users, E] float64: the summed token NLL of each user's `records` with every layer's
    routing forced to one expert (a user without records: 0)."""
    tables = user_routers(model)
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
    for t in user_routers(model):
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
    rows = record_rows(records)
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
