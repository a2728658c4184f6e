"""`proper demo`: the whole method on the built-in synthetic task, offline, on a CPU.

A tiny Llama is built from a config with a word-level tokenizer over the task's words,
pretrained briefly on the task format (the "base model": it knows the vocabulary and the
prompt/answer layout, not the users), then six rows are trained and evaluated on the same
split and seed:

  base            the base model alone
  stage 1         population LoRA (PROPER stage 1)
  per-user LoRA   a LoRA per user trained from the base (OPPU-style), no group level
  MoE-LoRA        LoRA experts with a token router (no user information)
  PROPER stage 2  group experts with the user-aware router
  PROPER stage 3  + each user's LoRA and the LoRA-aware router
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..config import ProperConfig
from ..train.data import UserIndex, special_token_ids
from ..io import load_adapters, save_adapters
from ..train.metrics import adjusted_rand_index
from ..patching import patch_model, proper_layers
from ..train.pipeline import batch_sampler, encode_split, evaluate
from ..train.stages import PipelineConfig, base_for_stage, is_done, load_stage, run_stage
from ..train.synthetic import make_task
from ..train.trainer import TrainConfig, train

# every linear projection of a Llama block. The FFN alone cannot learn the groups' answers:
# at an answer slot its input carries the base model's own answer for the topic (2 bits),
# not the topic (3 bits), so two topics with one base answer look alike to it; the attention
# value/output projections fetch the topic itself.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROWS = ("base", "stage 1", "per-user LoRA", "MoE-LoRA (token router)", "PROPER stage 2", "PROPER stage 3")


@dataclass
class DemoConfig:
    num_users: int = 200
    num_groups: int = 4
    num_styles: int = 12  # more styles than experts: the group level cannot route on style
    topics_per_record: int = 3
    group_restarts: int = 2  # starts of stage 2's user-to-group assignment (the best is kept)
    seed: int = 0
    hidden: int = 64
    layers: int = 2
    batch_size: int = 32
    pretrain_steps: int = 300
    steps: dict = field(default_factory=lambda: {1: 300, 2: 800, 3: 400, "oppu": 400, "moe": 400})
    lr: dict = field(default_factory=lambda: {1: 5e-3, 2: 3e-3, 3: 2e-3, "oppu": 2e-3, "moe": 1e-2})
    max_length: int = 16
    progress: bool = True


def word_tokenizer(words):
    """A word-level HF tokenizer over `words` (offline; no download)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + list(words))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_llama(vocab_size: int, hidden: int, layers: int, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


class Demo:
    """The task, tokenizer, split and base model of one demo run (under `out`)."""

    def __init__(self, cfg: DemoConfig, out: Path) -> None:
        self.cfg, self.out = cfg, Path(out)
        self.task = make_task(num_users=cfg.num_users, num_groups=cfg.num_groups, num_styles=cfg.num_styles,
                              topics_per_record=cfg.topics_per_record, seed=cfg.seed)
        self.split = self.task.split(seed=cfg.seed)
        self.tokenizer = word_tokenizer(self.task.vocabulary())
        self.users = UserIndex.from_examples(self.task.examples)
        self.pad = special_token_ids(self.tokenizer)[2]
        self.train_enc = encode_split(self.split.train, self.tokenizer, self.users, cfg.max_length)
        self.pcfg = PipelineConfig(
            num_users=len(self.users), target_modules=ALL_LINEAR,
            population_rank=8, population_alpha=16.0, num_experts=cfg.num_groups, top_k=2, rank=8, alpha=16.0,
            user_rank=4, user_alpha=8.0, group_restarts=cfg.group_restarts,
            train={s: self._tc(s) for s in (1, 2, 3)},
        )

    def _tc(self, key) -> TrainConfig:
        c = self.cfg
        return TrainConfig(steps=c.steps[key], lr=c.lr[key], save_every=100, seed=c.seed, progress=c.progress,
                           schedule="cosine", warmup=0.05)

    def sampler(self, balance: str, salt: int) -> Callable[[int], dict]:
        return batch_sampler(self.train_enc, self.pad, self.cfg.batch_size, self.cfg.seed * 101 + salt, balance)

    # -- the base model: the task's format, learned by a short full pretraining -----------

    def base(self) -> nn.Module:
        path = self.out / "base" / "model.safetensors"
        model = tiny_llama(len(self.tokenizer), self.cfg.hidden, self.cfg.layers, self.cfg.seed)
        if not path.is_file():
            self._pretrain(model)
            from safetensors.torch import save_model

            path.parent.mkdir(parents=True, exist_ok=True)
            save_model(model, str(path))
        from safetensors.torch import load_model

        load_model(model, str(path))
        return model.eval()

    def _pretrain(self, model: nn.Module) -> None:
        """Teach the tiny model the vocabulary and the prompt -> "answer style" layout. The
        answer follows the topic by a fixed rule that no group shares (so the model learns
        that the topic matters, not any preference); the style is random."""
        rng = torch.Generator().manual_seed(self.cfg.seed + 7)
        t = self.task
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        bos, eos, pad = special_token_ids(self.tokenizer)
        vocab = self.tokenizer.get_vocab()
        for _ in range(self.cfg.pretrain_steps):
            seqs = []
            for _ in range(self.cfg.batch_size):
                ps = torch.randperm(len(t.topics), generator=rng)[: t.config.topics_per_record].tolist()
                sty = t.style_words[int(torch.randint(len(t.style_words), (1,), generator=rng))]
                words = (t.prompt.format(topic=" ".join(t.topics[p] for p in ps)).split()
                         + [self._pretrain_answer(p) for p in ps] + [sty])
                seqs.append([bos] + [vocab[w] for w in words] + [eos])
            ids = torch.tensor(seqs)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()

    def _pretrain_answer(self, p: int) -> str:
        """The base model's own rule: an answer no group gives on topic p when there is one."""
        t = self.task
        taken = {t.preferences[g][p] for g in range(len(t.preferences))}
        free = [a for a in t.answers if a not in taken]
        return free[p % len(free)] if free else t.answers[(p * 7 + 3) % len(t.answers)]

    # -- rows --------------------------------------------------------------------------------

    def _variant(self, name: str, start: Callable[[], nn.Module], key, balance: str,
                 trainable=None, aux: bool = False) -> nn.Module:
        """Train (or resume, or reuse) a baseline row stored under out/<name>/."""
        final = self.out / name / "final"
        model = start()
        if (final / "adapter_model.safetensors").is_file():
            return load_adapters(model, final).eval()
        tc = self._tc(key)
        if not aux:
            tc = replace(tc, load_balance=0.0, distinctness=0.0)
        train(model, self.sampler(balance, zlib.crc32(name.encode()) % 997), tc, self.out / name / "checkpoints",
              trainable=trainable, desc=name)
        save_adapters(model, final)
        return model.eval()

    def run_stages(self) -> None:
        samplers = {1: self.sampler("record", 1), 2: self.sampler("record", 2), 3: self.sampler("user", 3)}
        for s in (1, 2, 3):
            if not is_done(self.out, s):
                run_stage(self.base, samplers[s], self.out, self.pcfg, s, records=self.train_enc, pad_id=self.pad)

    def models(self) -> dict[str, nn.Module]:
        self.run_stages()
        p = self.pcfg
        oppu_cfg = ProperConfig(num_experts=1, top_k=1, rank=1, router=(), user_rank=p.user_rank,
                                user_alpha=p.user_alpha, num_users=p.num_users, target_modules=p.target_modules)
        moe_cfg = ProperConfig(num_experts=p.num_experts, top_k=p.top_k, rank=p.rank, alpha=p.alpha, user_rank=0,
                               num_users=p.num_users, router=("token",), target_modules=p.target_modules)
        return {
            "base": self.base(),
            "stage 1": load_stage(self.base, self.out, 1),
            "per-user LoRA": self._variant("oppu", lambda: patch_model(self.base(), oppu_cfg), "oppu", "user",
                                           trainable=lambda n: n.endswith(("user_A", "user_B"))),
            "MoE-LoRA (token router)": self._variant("moe", lambda: patch_model(base_for_stage(self.base, self.out, 2), moe_cfg),
                                                     "moe", "record", aux=True),
            "PROPER stage 2": load_stage(self.base, self.out, 2),
            "PROPER stage 3": load_stage(self.base, self.out, 3),
        }

    def evaluate(self, models: dict[str, nn.Module], test=None) -> dict[str, dict]:
        test = self.split.test if test is None else test
        return {name: evaluate(m, test, self.split.train, self.tokenizer, self.users, self.cfg.max_length,
                               max_new_tokens=self.cfg.topics_per_record + 1, kind="classification", labels=self.task.labels())
                for name, m in models.items()}

    def group_ari(self) -> float:
        """Mean over layers of the adjusted Rand index between each user's argmax expert in
        the user-aware router of stage 2 and the true groups (users with a training record)."""
        model = load_stage(self.base, self.out, 2)
        seen = sorted({self.users.row(ex.user_id) for ex in self.split.train})
        truth = [self.task.truth[self.users.user(r)] for r in seen]
        scores = [adjusted_rand_index(layer.router_user[seen].argmax(-1).tolist(), truth)
                  for layer in proper_layers(model).values()]
        return sum(scores) / len(scores)


def format_table(results: dict[str, dict], metric: str = "accuracy") -> str:
    buckets = list(next(iter(results.values())).keys())
    first = next(iter(results.values()))
    head = "| method | " + " | ".join(f"{b} train records ({first[b]['users']} users)" if b != "all" else "all"
                                      for b in buckets) + " |"
    lines = [head, "|" + "---|" * (len(buckets) + 1)]
    for name, table in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{table[b][metric]:.3f}" for b in buckets) + " |")
    return "\n".join(lines)


def run(out: Path, cfg: Optional[DemoConfig] = None, log: Callable[[str], None] = print) -> dict:
    cfg = cfg or DemoConfig()
    t0 = time.time()
    demo = Demo(cfg, out)
    log(f"synthetic task: {cfg.num_users} users in {demo.task.config.num_groups} groups, "
        f"{len(demo.split.train)} train / {len(demo.split.test)} test records; outputs under {out}")
    results = demo.evaluate(demo.models())
    ari = demo.group_ari()
    log(format_table(results))
    log(f"adjusted Rand index of the user-aware router's groups vs the true groups: {ari:.3f}")
    log(f"(exact-match accuracy on the test split by the users' number of training records; "
        f"{time.time() - t0:.0f} s)")
    return {"results": results, "ari": ari, "seconds": time.time() - t0}
