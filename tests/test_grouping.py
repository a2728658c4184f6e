"""Stage 2's grouping machinery: k-means++, the per-user gradient sketches, the assignment
schedule and the split-and-merge move, each checked on inputs whose answer is known."""

import math

import pytest
import torch
from _helpers.stages import batch_at, records, split_merge_case
from _helpers.models import LLAMA, NUM_USERS

import proper
from proper.train.data import pad_encoded
from proper.train.grouping import initial_groups, kmeans, user_features
from proper.train.metrics import adjusted_rand_index
from proper.train.stages import PipelineConfig, assignment_steps, run_stage, split_merge_move
from proper.train.trainer import TrainConfig


def blobs(k=4, per=30, dim=8, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g, dtype=torch.float64) * 3
    labels = torch.arange(k).repeat_interleave(per)
    x = centres[labels] + spread * torch.randn(k * per, dim, generator=g, dtype=torch.float64)
    perm = torch.randperm(k * per, generator=g)
    return x[perm], labels[perm]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_separated_blobs(seed):
    x, truth = blobs(seed=seed)
    assign, inertia = kmeans(x, 4, seed=seed)
    assert adjusted_rand_index(assign.tolist(), truth.tolist()) == 1.0
    centres = torch.stack([x[assign == j].mean(0) for j in range(4)])
    assert inertia == pytest.approx(float((x - centres[assign]).pow(2).sum()), rel=1e-9)


def test_kmeans_weights_and_edge_cases():
    # two points far away with large weight pull the single centre to them
    x = torch.tensor([[0.0], [1.0], [10.0]], dtype=torch.float64)
    _, inertia = kmeans(x, 1, weights=torch.tensor([1.0, 1.0, 98.0]))
    mean = (0.0 + 1.0 + 980.0) / 100.0
    assert inertia == pytest.approx(1 * mean ** 2 + 1 * (1 - mean) ** 2 + 98 * (10 - mean) ** 2)
    assign, inertia = kmeans(x, 3)
    assert sorted(assign.tolist()) == [0, 1, 2] and inertia == 0.0
    for k in (0, 4):
        with pytest.raises(ValueError, match="k must be in"):
            kmeans(x, k)


def test_user_features_are_per_user_means_of_the_sketch():
    model = LLAMA.build().double().eval()  # float64: the batched and the one-record forward agree
    recs = records((3, 1, 0, 2, 5))
    feats, counts = user_features(model, recs, pad_id=0, num_users=NUM_USERS, seed=3)
    assert feats.shape == (NUM_USERS, 32 * 16) and feats.dtype == torch.float64
    assert counts[:5].tolist() == [3, 1, 0, 2, 5] and counts[5:].sum() == 0
    assert torch.equal(feats[2], torch.zeros_like(feats[2])) and (feats[[0, 1, 3, 4]].norm(dim=1) > 0).all()
    # independent recomputation of user 1's single record: sum_t (p_t - e_y) (x) h_t, projected
    g = torch.Generator().manual_seed(3)
    V, H = model.get_output_embeddings().weight.shape
    pv = torch.randn(V, 32, generator=g, dtype=torch.float64) / math.sqrt(32)
    ph = torch.randn(H, 16, generator=g, dtype=torch.float64) / math.sqrt(16)
    rec = next(r for r in recs if r.user_row == 1)
    batch = pad_encoded([rec], 0)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    want = torch.zeros(32, 16, dtype=torch.float64)
    labels = batch["labels"][0]
    for t in range(labels.shape[0] - 1):
        y = int(labels[t + 1])
        if y == -100:
            continue
        pull = out.logits[0, t].double().softmax(-1) @ pv - pv[y]
        want += torch.outer(pull, out.hidden_states[-1][0, t].double() @ ph)
    torch.testing.assert_close(feats[1], want.flatten(), rtol=1e-6, atol=1e-9)
    # users with records are grouped, the others are not
    rows, groups = initial_groups(model, recs, 0, NUM_USERS, 2)
    assert rows.tolist() == [0, 1, 3, 4] and set(groups.tolist()) <= {0, 1}


@pytest.mark.parametrize("steps,count,until,want", [
    (24, 8, 0.75, 8), (1000, 8, 0.75, 8), (5, 8, 0.75, 3), (10, 0, 0.75, 0), (10, 4, 0.0, 0), (1, 3, 1.0, 1)])
def test_assignment_steps_spread_over_a_fraction_of_the_stage(steps, count, until, want):
    at = assignment_steps(steps, count, until)
    assert len(at) == want
    assert all(1 <= s <= int(until * steps) for s in at)
    if want > 1:  # evenly spread: the last one at the end of the span
        assert max(at) == int(until * steps)


def test_a_short_stage2_with_top1_still_assigns_users(tmp_path):
    """24 steps, top_k=1 (the gate is 1, so R gets no gradient): the assignment steps, which
    are then R's only teacher, still run, 8 times (they used to start at step 50)."""
    tc = TrainConfig(steps=24, lr=3e-2, save_every=24, progress=False, schedule="cosine", warmup=0.1)
    cfg = PipelineConfig(num_users=NUM_USERS, target_modules=LLAMA.targets, num_experts=3, top_k=1, rank=4,
                         train={1: tc, 2: tc, 3: tc}, group_init="random")
    recs = records((6, 6, 0, 6, 6))
    run_stage(LLAMA.build, batch_at, tmp_path, cfg, 1)
    calls = []
    import proper.train.stages as st

    real = st.assign_groups

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    st.assign_groups = counting
    try:
        run_stage(LLAMA.build, batch_at, tmp_path, cfg, 2, records=recs, pad_id=0)
    finally:
        st.assign_groups = real
    assert len(calls) == len(assignment_steps(24, cfg.group_assignments, cfg.group_assign_until)) == 8


def test_split_merge_move_frees_a_redundant_expert_for_the_worst_one():
    """3 is merged into 2 (or 2 into 3), and the freed expert takes a copy of expert 1 and
    part of its users."""
    model, recs, L, rows, start = split_merge_case()
    start = start.tolist()
    before = {n: l.lora_A.detach().clone() for n, l in proper.proper_layers(model).items()}
    new = split_merge_move(model, recs, 0, L, rows, torch.tensor(start))
    freed, into = (3, 2) if new[5] == 2 else (2, 3)
    assert new[4].item() == new[5].item() == into  # merged
    assert new[0].item() == 0
    assert set(new[1:4].tolist()) == {1, freed}  # expert 1's users split between it and the freed one
    for name, layer in proper.proper_layers(model).items():
        assert torch.equal(layer.lora_A[freed], before[name][1]) and torch.equal(layer.lora_B[freed], layer.lora_B[1])
    # when every merge costs more than a third of the excess, nothing moves and the model is untouched
    L2 = L.clone()
    L2[4, 3] = L2[5, 2] = 40.0
    saved = {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for n, l in proper.proper_layers(model).items()}
    same = split_merge_move(model, recs, 0, L2, rows, torch.tensor(start))
    assert same.tolist() == start
    for n, l in proper.proper_layers(model).items():
        assert torch.equal(l.lora_A, saved[n][0]) and torch.equal(l.lora_B, saved[n][1])
