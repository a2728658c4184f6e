"""What the 2-rank workers of tests/test_distributed.py share with the one-process runs they
are compared with: the training settings, the batches, and stage 1-3's configuration and records.

The workers run as scripts under torchrun with the tests directory on sys.path, and import
these from here (never from a test module)."""

import torch

from proper.train.data import Encoded
from proper.train.stages import PipelineConfig
from proper.train.trainer import TrainConfig

from .models import LLAMA, NUM_USERS, VOCAB

# lr 1e-3: Adam divides each gradient by its own size, so an element whose gradient is a
# cancellation near zero turns fp32 summation-order noise (one process vs two) into a step
# of up to lr; at 1e-3 that stays well inside the 1e-5 the adapters must agree to.
CFG = dict(steps=4, lr=1e-3, save_every=2, progress=False, load_balance=0.05, distinctness=0.05)
FSDP_CFG = dict(steps=4, lr=1e-3, save_every=2, progress=False, load_balance=0.05, distinctness=0.05)


def batch_at(step):
    g = torch.Generator().manual_seed(3000 + step)
    ids = torch.randint(0, VOCAB, (8, 7), generator=g)
    return {"input_ids": ids, "labels": ids, "user_rows": torch.randint(-1, NUM_USERS, (8,), generator=g)}


def stage_config():
    tc = TrainConfig(**{**CFG, "steps": 3})
    return PipelineConfig(num_users=NUM_USERS, target_modules=LLAMA.targets, num_experts=3, top_k=2, rank=4,
                          user_rank=2, train={1: tc, 2: tc, 3: tc}, group_assignments=2)


def stage_records():
    g = torch.Generator().manual_seed(9)
    return [Encoded(tuple(torch.randint(4, VOCAB, (3,), generator=g).tolist()),
                    tuple(torch.randint(4, VOCAB, (3,), generator=g).tolist()), u % NUM_USERS) for u in range(12)]


def only_tables(name: str) -> bool:
    return name.endswith(("user_A", "user_B", "router_user"))
