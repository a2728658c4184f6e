"""A user's whole adapter exported as a PEFT LoRA gives that user's outputs, loaded by peft."""

import pytest
import torch
from conftest import GPT2, LLAMA, NUM_USERS, full_config, make_batch, randomize_adapters

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


def test_token_dependent_gates_are_refused(tmp_path):
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets))  # token + user + lora routers
    with pytest.raises(ValueError, match="depend on the token"):
        export_peft(model, 0, tmp_path)
    with pytest.raises(ValueError, match="user must be a bank row"):
        export_peft(proper.patch_model(LLAMA.build(), full_config(LLAMA.targets, router=("user",))), NUM_USERS,
                    tmp_path)
