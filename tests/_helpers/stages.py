"""The stage tests' inputs: training batches, encoded records per user, and a stage-2 model
whose split-and-merge move is known."""

import torch

import proper
from proper.train.data import Encoded

from .models import LLAMA, NUM_USERS, VOCAB


def batch_at(step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (4, 8), generator=g)
    return {"input_ids": ids, "labels": ids, "user_rows": torch.randint(-1, NUM_USERS, (4,), generator=g)}


def records(n_per_user=(3, 1, 0, 2, 5), seed=0):
    """Encoded training records: user row u gets n_per_user[u] records (row 2 none)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for u, n in enumerate(n_per_user):
        for _ in range(n):
            L = int(torch.randint(2, 5, (1,), generator=g))
            out.append(Encoded(tuple(torch.randint(4, VOCAB, (3,), generator=g).tolist()),
                               tuple(torch.randint(4, VOCAB, (L,), generator=g).tolist()), u))
    return out


def split_merge_case():
    """(stage-2 model, records, L, rows, start): experts 2 and 3 serve their users equally well
    (a merge costs nothing) and expert 1's users lose far more than the others' (a mixture),
    so split_merge_move must make its move. Also the case of the 2-rank FSDP test."""
    torch.manual_seed(0)
    cfg = proper.ProperConfig(num_experts=4, top_k=2, rank=4, alpha=8.0, user_rank=0, num_users=NUM_USERS,
                              router=("user",), share_user_router=True, dropout=0.0, target_modules=list(LLAMA.targets))
    model = proper.patch_model(LLAMA.build(), cfg)
    with torch.no_grad():
        for layer in proper.proper_layers(model).values():
            layer.lora_B.normal_(0.0, 0.3)
    L = torch.full((NUM_USERS, 4), 40.0, dtype=torch.float64)
    L[0, 0] = 8.0  # expert 0 fits its user: 2 nats a record
    L[1:4, 1] = 24.0  # expert 1's users: 6 nats a record
    L[4:6, 2] = L[4:6, 3] = 8.0  # experts 2 and 3 are interchangeable
    return model, records((4,) * NUM_USERS), L, torch.arange(NUM_USERS), torch.tensor([0, 1, 1, 1, 2, 3])
