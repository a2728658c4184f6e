"""A user's whole adapter exported as a PEFT LoRA gives that user's outputs, loaded by peft."""

import pytest
import torch
from _helpers.models import GPT2, LLAMA, NUM_USERS, full_config, make_batch, population_config, randomize_adapters

import proper
from proper.export import export_peft

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("spec", [LLAMA, GPT2], ids=repr)
@pytest.mark.parametrize("user", [4, -1])
def test_exported_lora_equals_the_patched_model(spec, user, tmp_path):
    model = proper.patch_model(spec.build(), full_config(spec.targets, router=("user",))).eval()
    randomize_adapters(model)
    ids = make_batch()
    with torch.no_grad(), proper.user_context(model, [user] * ids.shape[0]):
        want = model(input_ids=ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_peft(model, user, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is unchanged
    loaded = peft.PeftModel.from_pretrained(spec.build(), str(tmp_path)).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("spec,stage1_targets", [(LLAMA, LLAMA.targets), (LLAMA, ("q_proj", "v_proj", "o_proj")),
                                                  (GPT2, GPT2.targets)], ids=["llama", "llama-attn-stage1", "gpt2"])
def test_a_merged_population_lora_is_folded_back_in(spec, stage1_targets, tmp_path):
    """Stage 2 trains on the base with stage 1 merged; its export, loaded by peft onto the
    original model, must still give the stage-2 model's outputs (stage 1's targets may differ
    from stage 2's: those modules get stage 1's LoRA alone, zero-padded to the common rank)."""
    model = proper.patch_model(spec.build().eval(), population_config(stage1_targets, rank=3, alpha=5.0))
    randomize_adapters(model, seed=5, std=0.2)
    proper.merge(model)
    assert len(proper.merged_loras(model)) == 1
    proper.patch_model(model, full_config(spec.targets, router=("user",)))
    randomize_adapters(model)
    ids = make_batch()
    with torch.no_grad(), proper.user_context(model, [4] * ids.shape[0]):
        want = model(input_ids=ids).logits
    with torch.no_grad():
        original = spec.build().eval()(input_ids=ids).logits
    export_peft(model, 4, tmp_path)
    loaded = peft.PeftModel.from_pretrained(spec.build(), str(tmp_path)).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * scale
    assert (original - want).abs().max().item() > 1e-2 * scale  # the adapters matter: the check can fail


def test_token_dependent_gates_are_refused(tmp_path):
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets))  # token + user + lora routers
    with pytest.raises(ValueError, match="depend on the token"):
        export_peft(model, 0, tmp_path)
    with pytest.raises(ValueError, match="user must be a bank row"):
        export_peft(proper.patch_model(LLAMA.build(), full_config(LLAMA.targets, router=("user",))), NUM_USERS,
                    tmp_path)
