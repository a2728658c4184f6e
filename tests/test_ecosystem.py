"""User ids through the model's own calls: model(..., user_ids=), model.generate(...,
user_ids=), transformers' Trainer with a user_ids column, and modules built by hand."""

import inspect

import pytest
import torch
from _helpers.models import BATCH_IDS, LLAMA, NUM_USERS, VOCAB, full_config, make_batch

import proper


def trained_like(model):
    """Nonzero B matrices, so that every level changes the output."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in proper.proper_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
            layer.user_B.copy_(torch.randn(layer.user_B.shape, generator=g) * 0.5)
    return model


def patched():
    return trained_like(proper.patch_model(LLAMA.build(), full_config(LLAMA.targets)))


def test_forward_takes_user_ids_and_equals_the_context():
    model = patched()
    assert "user_ids" in inspect.signature(model.forward).parameters
    ids, uid = make_batch(), torch.tensor(BATCH_IDS)
    with proper.user_context(model, uid):
        want = model(input_ids=ids).logits
    got = model(input_ids=ids, attention_mask=torch.ones_like(ids), user_ids=uid).logits
    assert torch.equal(got, want)
    other = model(input_ids=ids, user_ids=torch.tensor([1, 1, 1, 1])).logits
    assert not torch.allclose(other, want)  # the ids really reach the layers
    with pytest.raises(ValueError, match="user_ids contains 99"):
        model(input_ids=ids, user_ids=torch.tensor([0, 99, 1, 2]))
    with pytest.raises(RuntimeError, match="no user ids were given"):
        model(input_ids=ids)  # outside any context and without user_ids


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_takes_user_ids(beams):
    model = patched()
    ids, uid = make_batch(), torch.tensor(BATCH_IDS)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=beams, attention_mask=torch.ones_like(ids),
              pad_token_id=0)
    with proper.user_context(model, uid.repeat_interleave(beams)):  # what generate's expansion does
        want = model.generate(ids, **kw)
    got = model.generate(ids, user_ids=uid, **kw)
    assert torch.equal(got, want) and got.shape[1] == ids.shape[1] + 4


def test_unpatch_removes_user_ids_and_a_refused_patch_never_adds_it(monkeypatch):
    model = LLAMA.build()
    original = model.forward
    proper.patch_model(model, full_config(LLAMA.targets))
    proper.unpatch(model)
    assert "forward" not in vars(model) and "user_ids" not in inspect.signature(model.forward).parameters
    assert model.forward == original
    from proper import patching

    def boom(*a, **kw):
        raise RuntimeError("injected")

    monkeypatch.setattr(patching, "accept_user_ids", boom)
    with pytest.raises(RuntimeError, match="injected"):
        proper.patch_model(model, full_config(LLAMA.targets))
    assert "forward" not in vars(model) and not proper.is_patched(model)


class HandMade(torch.nn.Module):
    """A module a user built with ProperLinear layers, without patch_model."""

    def __init__(self, config):
        super().__init__()
        torch.manual_seed(0)
        state = proper.layer.UserState(config.num_users)
        self.a = proper.ProperLinear(torch.nn.Linear(8, 8), config, state=state)
        self.b = proper.ProperLinear(torch.nn.Linear(8, 5), config)  # its own state
        for layer in (self.a, self.b):
            torch.nn.init.normal_(layer.lora_B, std=0.5)
            torch.nn.init.normal_(layer.user_B, std=0.5)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_user_context_and_user_ids_on_a_module_built_by_hand():
    cfg = proper.ProperConfig(num_experts=2, top_k=1, rank=2, num_users=4, user_rank=2, router=("token", "user"))
    m = HandMade(cfg)
    x = torch.randn(3, 6, 8)
    uid = torch.tensor([0, -1, 3])
    with proper.user_context(m, uid):
        want = m(x)
    by_layer = m.b(torch.relu(m.a(x, user_ids=uid)), user_ids=uid)
    assert torch.equal(want, by_layer)
    proper.accept_user_ids(m)
    assert torch.equal(m(x, user_ids=uid), want)
    with pytest.raises(ValueError, match="user_ids contains 4"):
        m(x, user_ids=torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="holds no ProperLinear layer"):
        with proper.user_context(torch.nn.Linear(2, 2), [0]):
            pass


def test_transformers_trainer_trains_with_a_user_ids_column(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets))
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(16):
        ids = torch.randint(0, VOCAB, (9,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone(), "user_ids": torch.tensor(i % 3),
                     "unused_column": torch.tensor(0)})
    before = {k: v.detach().clone() for k, v in proper.io.adapter_state_dict(model).items()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    out = Trainer(model=model, args=args, train_dataset=rows).train()  # remove_unused_columns=True (default)
    assert out.global_step == 3 and torch.isfinite(torch.tensor(out.training_loss))
    after = proper.io.adapter_state_dict(model)
    bank = [k for k in after if k.endswith(".user_B")]
    assert bank
    for k in bank:  # the rows of the users in the data (0, 1, 2) trained; the others untouched
        changed = (after[k] != before[k]).flatten(1).any(1)
        assert changed[:3].all() and not changed[3:NUM_USERS].any(), k


def test_trainer_over_jsonl_records_with_the_collator(tmp_path):
    """proper's JSONL records straight into Trainer, default settings, through TrainerCollator."""
    from transformers import Trainer, TrainingArguments

    from proper.train.data import TrainerCollator, UserIndex, load_jsonl
    from proper.apps.demo import tiny_llama, word_tokenizer
    from proper.train.synthetic import make_task

    task = make_task(num_users=5, seed=1)
    task.write_jsonl(tmp_path / "d.jsonl")
    data = load_jsonl(tmp_path / "d.jsonl")
    users = UserIndex.from_examples(data)
    tok = word_tokenizer(task.vocabulary())
    cfg = proper.ProperConfig(num_experts=2, top_k=1, rank=2, num_users=len(users), user_rank=2,
                              router=("token", "user"), target_modules=("gate_proj", "up_proj", "down_proj"))
    model = proper.patch_model(tiny_llama(len(tok), 32, 1, seed=0), cfg)
    collator = TrainerCollator(tok, users, 24)
    batch = collator(list(data)[:3])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "user_ids"}
    assert batch["user_ids"].tolist() == users.rows([ex.user_id for ex in list(data)[:3]]).tolist()
    before = {k: v.detach().clone() for k, v in proper.io.adapter_state_dict(model).items()}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    Trainer(model=model, args=args, train_dataset=data, data_collator=collator).train()
    after = proper.io.adapter_state_dict(model)
    assert any(not torch.equal(after[k], before[k]) for k in after if k.endswith(".user_B"))
    with pytest.raises(TypeError, match="batches proper.train.data.Example records"):
        collator([{"user_id": "u", "input": "x", "output": "y"}])


def test_activation_checkpointing_recomputes_with_the_batch_users():
    """The backward recomputes checkpointed layers after the context closed: same gradients."""
    ids, uid = make_batch(), torch.tensor(BATCH_IDS)
    grads = []
    for checkpointing in (False, True):
        model = patched()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=ids, labels=ids, user_ids=uid).loss.backward()
        grads.append({k: v.grad.clone() for k, v in proper.io.adapter_state_dict(model).items()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7), k


def test_trl_sft_trainer_trains_with_a_user_ids_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from proper.apps.demo import word_tokenizer

    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets))
    g = torch.Generator().manual_seed(0)
    ds = datasets.Dataset.from_dict({"input_ids": [torch.randint(0, VOCAB, (9,), generator=g).tolist()
                                                   for _ in range(16)],
                                     "user_ids": [i % 3 for i in range(16)]})

    def collate(rows):
        x = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone(),
                "user_ids": torch.tensor([r["user_ids"] for r in rows])}

    before = {k: v.detach().clone() for k, v in proper.io.adapter_state_dict(model).items()}
    # remove_unused_columns=False: SFTTrainer keeps only the columns it knows otherwise (proper.hf).
    # Its default activation checkpointing recomputes the layers in the backward.
    cfg = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                        report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False)
    out = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, data_collator=collate,
                         processing_class=word_tokenizer([f"w{i}" for i in range(VOCAB)])).train()
    assert out.global_step == 3
    after = proper.io.adapter_state_dict(model)
    for k in [k for k in after if k.endswith(".user_B")]:
        changed = (after[k] != before[k]).flatten(1).any(1)
        assert changed[:3].all() and not changed[3:NUM_USERS].any(), k


def test_trainer_checkpoints_hold_the_adapters_in_proper_format(tmp_path):
    from transformers import Trainer, TrainingArguments

    from proper.hf import ADAPTERS_DIR, SaveAdaptersCallback

    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(0, VOCAB, (9,), generator=g)), "labels": ids.clone(),
             "user_ids": torch.tensor(i % 3)} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             report_to=[], save_strategy="steps", save_steps=2, use_cpu=True)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[SaveAdaptersCallback()]).train()
    saved = tmp_path / "checkpoint-2" / ADAPTERS_DIR
    fresh = proper.load_adapters(LLAMA.build(), saved)
    want, got = proper.io.adapter_state_dict(model), proper.io.adapter_state_dict(fresh)
    assert want.keys() == got.keys() and all(torch.equal(want[k].detach(), got[k].detach()) for k in want)
