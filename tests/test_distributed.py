"""Two processes (torchrun, gloo, CPU) train the same adapters as one process: the bank is
sharded by user, DDP synchronises the rest; sharded checkpoints reshard exactly."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _helpers.distributed import CFG, FSDP_CFG, batch_at, only_tables, stage_config, stage_records
from _helpers.models import LLAMA, NUM_USERS, VOCAB, full_config
from _helpers.stages import split_merge_case

import proper
from proper.train.distributed import load_shard, local_batch, merge_shards, owners, split_adapters
from proper.io import adapter_state_dict
from proper.train.trainer import TrainConfig, train

TESTS = Path(__file__).resolve().parent


WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from _helpers.models import LLAMA, full_config
    import proper
    from proper.train.distributed import save_shard, owners
    from proper.train.trainer import TrainConfig, train
    from _helpers.distributed import batch_at, CFG
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = sys.argv[1]
    torch.manual_seed(0)
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets))
    start = {{k: v.detach().clone() for k, v in proper.io.adapter_state_dict(model).items()}}
    losses = train(model, batch_at, TrainConfig(**CFG), out + "/ckpt")
    save_shard(model, f"{{out}}/rank-{{rank}}", rank, world)
    # the bank rows this rank holds (local row j is user rank + j * world) and which changed
    changed, held = {{}}, {{}}
    for k, v in proper.io.adapter_state_dict(model).items():
        if k.endswith(("user_A", "user_B")):
            held[k] = v.shape[0]
            changed[k] = [rank + j * world for j in range(v.shape[0])
                          if not torch.equal(v[j], start[k][rank + j * world])]
    json.dump({{"rank": rank, "losses": losses, "changed": changed, "held": held}},
              open(f"{{out}}/rank-{{rank}}.json", "w"))
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, worker: str, name: str, out, *args: str) -> None:
    """Run `worker` (a template filled with the tests directory) on 2 gloo ranks, writing to `out`."""
    script = tmp_path / name
    script.write_text(worker.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(out),
                          *args], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    if run.returncode != 0:  # each rank's own traceback (the rank that failed first is the cause), then the tail
        lines = run.stderr.splitlines()
        per_rank = ["\n".join([ln for ln in lines if f"[rank{r}]" in ln][-40:]) for r in range(2)]
        aborts = [ln for ln in lines if "terminate called" in ln][:1]  # callers match this start-up abort
        raise AssertionError("\n".join(aborts + per_rank) + "\n" + run.stdout[-2000:] + run.stderr[-3000:])


def merged_adapters(tmp_path) -> dict:
    """The adapters the two ranks' shards (tmp_path/rank-0, rank-1) merge into."""
    return proper.io._read(merge_shards([tmp_path / "rank-0", tmp_path / "rank-1"], tmp_path / "merged"))[1]


def test_local_batches_partition_the_global_batch():
    b = batch_at(0)
    parts = [local_batch(b, r, 2) for r in range(2)]
    assert sum(p["input_ids"].shape[0] for p, _ in parts) == 8
    for r, (p, n) in enumerate(parts):
        assert n == int((b["labels"][:, 1:] != -100).sum())
        assert bool((owners(p["user_rows"], 2) == r).all()) or p["user_rows"].tolist() == [-1]
    # a rank without any of the batch's users gets one unscored sequence
    only0 = {**b, "user_rows": torch.zeros(8, dtype=torch.long)}
    p, _ = local_batch(only0, 1, 2)
    assert p["user_rows"].tolist() == [-1] and bool((p["labels"] == -100).all())


@pytest.mark.slow
def test_two_ranks_train_the_same_adapters_as_one_and_reshard_exactly(tmp_path):
    torchrun(tmp_path, WORKER, "worker.py", tmp_path)

    torch.manual_seed(0)
    one = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets))
    losses = train(one, batch_at, TrainConfig(**CFG), tmp_path / "one")
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["losses"] == pytest.approx(losses, rel=1e-5)
        # each rank holds (and trains) only the bank rows of its own users
        assert set(r["held"].values()) == {len(range(r["rank"], NUM_USERS, 2))}, r["held"]
    assert any(r["changed"][k] for r in ranks for k in r["changed"])

    merged = merge_shards([tmp_path / "rank-0", tmp_path / "rank-1"], tmp_path / "merged")
    back = proper.load_adapters(LLAMA.build(), merged)
    want = adapter_state_dict(one)
    got = adapter_state_dict(back)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")  # to 1e-5, fp32

    # 2 ranks -> 1 -> 2 again: the same outputs for every user, exactly
    shards = split_adapters(merged, tmp_path / "again", 2)
    ids = torch.randint(0, VOCAB, (NUM_USERS + 1, 6), generator=torch.Generator().manual_seed(5))
    users = list(range(NUM_USERS)) + [-1]
    with torch.no_grad(), proper.user_context(back, users):
        ref = back(input_ids=ids).logits
    for r, shard in enumerate(shards):
        model = load_shard(proper.patch_model(LLAMA.build(), full_config(LLAMA.targets)), shard)
        with torch.no_grad(), proper.user_context(model, users):
            out = model(input_ids=ids).logits
        mine = [i for i, u in enumerate(users) if u >= 0 and u % 2 == r]
        assert torch.equal(out[mine], ref[mine])
    remerged = merge_shards(shards, tmp_path / "remerged")
    a, b = proper.io._read(Path(merged))[1], proper.io._read(Path(remerged))[1]
    assert all(torch.equal(a[k], b[k]) for k in a)


STAGES_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from _helpers.models import LLAMA
    from proper.train.stages import run_stage
    from _helpers.distributed import batch_at, stage_config, stage_records
    dist.init_process_group("gloo")
    for stage in (1, 2, 3):
        torch.manual_seed(stage)
        run_stage(LLAMA.build, batch_at, sys.argv[1], stage_config(), stage, records=stage_records(), pad_id=0)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_run_stage_under_torchrun_writes_merged_finals_like_one_process(tmp_path):
    from proper.train.stages import load_stage, run_stage, stage_dir

    torchrun(tmp_path, STAGES_WORKER, "stages.py", tmp_path / "two")
    for stage in (1, 2, 3):
        torch.manual_seed(stage)
        run_stage(LLAMA.build, batch_at, tmp_path / "one", stage_config(), stage, records=stage_records(), pad_id=0)
        assert (stage_dir(tmp_path / "two", stage) / "loss.png").is_file()
        two = adapter_state_dict(load_stage(LLAMA.build, tmp_path / "two", stage))
        one = adapter_state_dict(load_stage(LLAMA.build, tmp_path / "one", stage))
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"stage {stage} {k}: {m}")


def _cli_workspace(root):
    from proper.apps.demo import tiny_llama, word_tokenizer
    from proper.train.synthetic import make_task

    task = make_task(num_users=12, seed=3)
    task.write_jsonl(root / "data.jsonl")
    tok = word_tokenizer(task.vocabulary())
    tiny_llama(len(tok), 32, 1, seed=0).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")


def _finals(out):
    return {s: proper.io._read(out / f"stage{s}" / "final")[1] for s in (1, 2, 3)}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate", "torchrun-fsdp"])
def test_proper_train_runs_unchanged_under_a_launcher(tmp_path, launcher):
    """`proper train` on 2 gloo processes, started by torchrun or by `accelerate launch`, with
    DDP or FSDP, writes the stage finals one process writes (aux losses on)."""
    from proper.apps.cli import main

    _cli_workspace(tmp_path)
    args = ["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.jsonl"),
            "--max-length", "16", "--steps", "4", "--save-every", "2", "--experts", "2", "--rank", "2",
            "--user-rank", "2", "--lr", "1e-3", "--batch-size", "4"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0

    port = str(_free_port())
    extra = ["--parallel", "fsdp"] if launcher.endswith("fsdp") else []
    if launcher.startswith("torchrun"):
        start = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--master_addr", "127.0.0.1", "--master_port", port]
    else:  # --multi_gpu is accelerate's torch.distributed launcher; without a GPU the ranks use gloo
        start = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
                 "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "--main_process_port", port]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # no user accelerate config
    run = subprocess.run([*start, "-m", "proper.apps.cli", *args, *extra, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert run.stdout.count("stage 3 done") == 1  # rank 0 reports
    one, two = _finals(tmp_path / "one"), _finals(tmp_path / "two")
    for s in (1, 2, 3):
        assert one[s].keys() == two[s].keys()
        for k in one[s]:
            torch.testing.assert_close(two[s][k], one[s][k], rtol=1e-5, atol=1e-5, msg=lambda m: f"stage {s} {k}: {m}")
    assert (tmp_path / "two" / "stage3" / "shards" / "rank-1-of-2").is_dir()


FSDP_WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from _helpers.models import LLAMA, full_config
    import proper
    from proper.train.distributed import save_shard
    from proper.train.trainer import TrainConfig, train
    from _helpers.distributed import batch_at, FSDP_CFG
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out, mp = sys.argv[1], (None if sys.argv[2] == "fp32" else sys.argv[2])

    def model():
        torch.manual_seed(0)
        return proper.patch_model(LLAMA.build(), full_config(LLAMA.targets, share_user_router=True))

    cfg = dict(FSDP_CFG, parallel="fsdp", mixed_precision=mp)
    train(model(), batch_at, TrainConfig(**{{**cfg, "steps": 2}}), out + "/ckpt")  # stops after 2 steps
    resumed = model()  # a new process would start so: resumes at step 2 from the rank's checkpoint
    losses = train(resumed, batch_at, TrainConfig(**cfg), out + "/ckpt")
    save_shard(resumed, f"{{out}}/rank-{{rank}}")
    sharded = sorted(n.rsplit(".", 1)[-1] for n, p in resumed.named_parameters() if hasattr(p, "full_tensor"))
    json.dump({{"losses": losses, "sharded": sorted(set(sharded))}}, open(f"{{out}}/rank-{{rank}}.json", "w"))
    dist.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp_trains_the_adapters_one_process_trains(tmp_path, precision):
    """FSDP2 (fully_shard per decoder layer, the bank and the shared user router left out) on
    2 gloo ranks, stopped and resumed from its sharded checkpoints half way: fp32 reaches
    one process's adapters to 1e-5; bf16 compute (fp32 reduction) stays close to them."""
    torchrun(tmp_path, FSDP_WORKER, "fsdp.py", tmp_path, precision)
    torch.manual_seed(0)
    one = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets, share_user_router=True))
    start = {k: v.detach().clone() for k, v in adapter_state_dict(one).items()}
    losses = train(one, batch_at, TrainConfig(**FSDP_CFG))
    want = adapter_state_dict(one)
    got = merged_adapters(tmp_path)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert got.keys() == want.keys()
    for r in ranks:  # FSDP shards the group experts and routers (and the frozen base), not the per-user tables
        assert {"lora_A", "lora_B", "router_x", "router_h", "weight"} <= set(r["sharded"]), r["sharded"]
        assert not {"user_A", "user_B", "router_user"} & set(r["sharded"]), r["sharded"]
    if precision == "fp32":
        for r in ranks:
            assert r["losses"] == pytest.approx(losses, rel=1e-5)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")
    else:  # bf16 activations: losses to bf16's precision, the training updates to ~10-25%
        for r in ranks:
            assert r["losses"] == pytest.approx(losses, rel=1e-2)
        moved = torch.cat([(want[k] - start[k]).flatten() for k in want])
        off = torch.cat([(got[k] - want[k]).flatten() for k in want])
        assert moved.norm() > 0 and off.norm() / moved.norm() < 0.3, float(off.norm() / moved.norm())


def test_bf16_autocast_training_stays_close_to_fp32():
    """mixed_precision="bf16" without FSDP: the forward runs under autocast, the adapters stay fp32."""
    losses = {}
    for mp in (None, "bf16"):
        torch.manual_seed(0)
        model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets))
        losses[mp] = train(model, batch_at, TrainConfig(**CFG, mixed_precision=mp))
        assert {p.dtype for p in adapter_state_dict(model).values()} == {torch.float32}
    assert losses["bf16"] == pytest.approx(losses[None], rel=1e-2)
    assert losses["bf16"] != losses[None]  # it did compute in bf16
    with pytest.raises(ValueError, match="mixed_precision"):
        train(model, batch_at, TrainConfig(**CFG, mixed_precision="fp16"))


def test_checkpoints_of_another_number_of_processes_are_not_silently_ignored(tmp_path):
    torch.manual_seed(0)
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets))
    train(model, batch_at, TrainConfig(**{**CFG, "steps": 2}), tmp_path / "ckpt" / "rank-0-of-2")  # as rank 0 of 2 writes
    with pytest.raises(RuntimeError, match=r"another number of processes \(rank-0-of-2\)"):
        train(model, batch_at, TrainConfig(**CFG), tmp_path / "ckpt")


def test_a_rank_resumes_while_another_is_still_writing_its_checkpoint(tmp_path):
    """Rank 1 may resume before rank 0 has written its first checkpoint: this run's own
    number of processes counts, whichever rank wrote (the race CI met under load)."""
    from proper.train.trainer import _check_world

    torch.manual_seed(0)
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets))
    train(model, batch_at, TrainConfig(**{**CFG, "steps": 2}), tmp_path / "ckpt" / "rank-1-of-2")  # rank 1 only
    _check_world(tmp_path / "ckpt", 2)  # accepted
    with pytest.raises(RuntimeError, match=r"another number of processes \(rank-1-of-2\)"):
        _check_world(tmp_path / "ckpt", 4)


SPARSE_WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from _helpers.models import LLAMA, full_config
    import proper
    from proper.train.distributed import save_shard
    from proper.train.trainer import TrainConfig, train
    from _helpers.distributed import batch_at, CFG
    dist.init_process_group("gloo")
    out, parallel = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets, sparse_user_grad=True, share_user_router=True))
    losses = train(model, batch_at, TrainConfig(**CFG, parallel=parallel))
    save_shard(model, f"{{out}}/rank-{{dist.get_rank()}}")
    dist.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_sparse_user_gradients_on_two_ranks_train_what_one_process_trains(tmp_path, parallel):
    """sparse_user_grad (LazyAdamW) on 2 ranks: the bank shards' sparse gradients stay on their
    rank, the user router's are summed as sparse rows; the adapters are one process's."""
    torchrun(tmp_path, SPARSE_WORKER, "sparse.py", tmp_path, parallel)
    torch.manual_seed(0)
    one = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets, sparse_user_grad=True, share_user_router=True))
    train(one, batch_at, TrainConfig(**CFG))
    want = adapter_state_dict(one)
    got = merged_adapters(tmp_path)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


ONLY_TABLES_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from _helpers.models import LLAMA, full_config
    import proper
    from proper.train.distributed import save_shard
    from proper.train.trainer import TrainConfig, train
    from _helpers.distributed import batch_at, CFG, only_tables
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets, router=("user",)))
    train(model, batch_at, TrainConfig(**CFG), trainable=only_tables)
    save_shard(model, f"{{sys.argv[1]}}/rank-{{dist.get_rank()}}")
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_training_only_the_per_user_tables_on_two_ranks(tmp_path):
    """Nothing left for DDP (the bank and the user router train alone): still one process's adapters."""
    torchrun(tmp_path, ONLY_TABLES_WORKER, "tables.py", tmp_path)
    torch.manual_seed(0)
    one = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets, router=("user",)))
    train(one, batch_at, TrainConfig(**CFG), trainable=only_tables)
    want, got = adapter_state_dict(one), merged_adapters(tmp_path)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


SPLIT_MERGE_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from safetensors.torch import save_file
    import proper
    from proper.train.distributed import wrap_fsdp
    from proper.layer import whole
    from proper.train.stages import split_merge_move
    from _helpers.stages import split_merge_case
    dist.init_process_group("gloo")
    model, recs, L, rows, start = split_merge_case()
    wrap_fsdp(model)
    new = split_merge_move(model, recs, 0, L, rows, start)
    tensors = {{f"{{n}}.{{p}}": whole(getattr(l, p)).detach().clone().contiguous()
               for n, l in proper.proper_layers(model).items() for p in ("lora_A", "lora_B")}}
    tensors["experts"] = new
    save_file(tensors, f"{{sys.argv[1]}}/fsdp-{{dist.get_rank()}}.safetensors")
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_split_merge_move_under_fsdp_matches_one_process(tmp_path):
    """FSDP shards the experts' tables over ranks: a move copies an expert through the whole
    tensor and every rank keeps its part, so the result is one process's."""
    from safetensors.torch import load_file

    from proper.train.stages import split_merge_move

    try:
        torchrun(tmp_path, SPLIT_MERGE_WORKER, "split_merge.py", tmp_path)
    except AssertionError as e:
        # About 1 launch in 10 of this worker, under pytest only, rank 0 aborts at start-up
        # ("terminate called without an active exception", SIGABRT, no Python traceback);
        # 22 direct torchrun launches never did. Not understood yet: one more launch, and
        # any other failure is a failure.
        if "terminate called without an active exception" not in str(e):
            raise
        torchrun(tmp_path, SPLIT_MERGE_WORKER, "split_merge.py", tmp_path)
    model, recs, L, rows, start = split_merge_case()
    new = split_merge_move(model, recs, 0, L, rows, start)
    assert not torch.equal(new, start)  # a move was made
    for rank in range(2):
        got = load_file(str(tmp_path / f"fsdp-{rank}.safetensors"))
        assert torch.equal(got.pop("experts"), new)
        for n, layer in proper.proper_layers(model).items():
            for p in ("lora_A", "lora_B"):
                torch.testing.assert_close(got[f"{n}.{p}"], getattr(layer, p).detach(), rtol=1e-6, atol=1e-7)
