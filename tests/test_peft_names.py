"""Names a PEFT user knows, where the behaviour matches, and the runtime choices kept out of
the saved config (as PEFT keeps its runtime config out of adapter_config.json)."""

import json

import proper
import pytest
import torch
from _helpers.models import LLAMA, assert_state_equal, full_config, make_batch, output_of, population_config
from _helpers.models import randomize_adapters, state_copy
from proper.config import RUNTIME_FIELDS
from proper.io import CONFIG_NAME, FORMAT, WEIGHTS_NAME, _digest
from safetensors.torch import load_file, safe_open, save_file


def test_merge_and_unload_and_unload_are_peft_names_for_merge_and_unpatch():
    assert proper.merge_and_unload is proper.merge and proper.unload is proper.unpatch
    model = proper.patch_model(LLAMA.build(), population_config(LLAMA.targets))
    randomize_adapters(model)
    ids = make_batch()
    want = output_of(model, ids)
    merged = proper.merge_and_unload(model)
    assert not proper.is_patched(merged)
    torch.testing.assert_close(output_of(merged, ids), want, rtol=1e-5, atol=1e-5)
    plain = LLAMA.build()
    again = proper.unload(proper.patch_model(plain, full_config(LLAMA.targets)))
    assert again is plain and not proper.is_patched(plain)


def _saved_config_keys(path):
    on_disk = json.loads((path / CONFIG_NAME).read_text())
    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        in_file = json.loads(f.metadata()["config"])
    return set(on_disk), set(in_file)


def test_runtime_choices_are_not_saved_and_are_given_at_load(tmp_path):
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets, backend="torch", sparse_user_grad=True))
    randomize_adapters(model)
    proper.save_adapters(model, tmp_path / "a")
    on_disk, in_file = _saved_config_keys(tmp_path / "a")
    assert on_disk == in_file and not set(RUNTIME_FIELDS) & on_disk
    assert {"num_experts", "rank", "router", "user_rank"} <= on_disk

    loaded = proper.load_adapters(LLAMA.build(), tmp_path / "a")  # the defaults
    assert (proper.get_config(loaded).backend, proper.get_config(loaded).sparse_user_grad) == ("auto", False)
    chosen = proper.load_adapters(LLAMA.build(), tmp_path / "a", backend="torch", sparse_user_grad=True)
    layer = next(iter(proper.proper_layers(chosen).values()))
    assert (layer.backend, layer.sparse_user_grad) == ("torch", True)
    ids = make_batch()
    with proper.user_context(model, [0, 5, -1, 2]):
        want = output_of(model, ids)
    with proper.user_context(chosen, [0, 5, -1, 2]):
        torch.testing.assert_close(output_of(chosen, ids), want)


def test_a_runtime_choice_for_a_patched_model_is_refused_and_changes_nothing(tmp_path):
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets))
    randomize_adapters(model)
    proper.save_adapters(model, tmp_path / "a")
    before = state_copy(model)
    with pytest.raises(ValueError, match="backend= applies when it patches the model"):
        proper.load_adapters(model, tmp_path / "a", backend="torch")
    assert_state_equal(model, before)
    fresh = LLAMA.build()
    with pytest.raises(ValueError, match="ProperConfig.backend must be one of"):
        proper.load_adapters(fresh, tmp_path / "a", backend="fast")
    assert not proper.is_patched(fresh)


def test_a_file_written_with_runtime_choices_still_loads_without_them(tmp_path):
    """Adapters saved before the runtime choices were left out carry them; they load, and the
    file's backend is not imposed on the process that loads it."""
    model = proper.patch_model(LLAMA.build(), full_config(LLAMA.targets))
    randomize_adapters(model)
    proper.save_adapters(model, tmp_path / "new")
    tensors = load_file(str(tmp_path / "new" / WEIGHTS_NAME))
    old = {**json.loads((tmp_path / "new" / CONFIG_NAME).read_text()), "backend": "triton", "sparse_user_grad": True}
    old_json = json.dumps(old, indent=2, sort_keys=True)
    (tmp_path / "old").mkdir()
    save_file(tensors, str(tmp_path / "old" / WEIGHTS_NAME),
              metadata={"format": FORMAT, "config": old_json, "sha256": _digest(tensors, old_json)})
    (tmp_path / "old" / CONFIG_NAME).write_text(old_json + "\n")
    loaded = proper.load_adapters(LLAMA.build(), tmp_path / "old")
    assert (proper.get_config(loaded).backend, proper.get_config(loaded).sparse_user_grad) == ("auto", False)
    ids = make_batch()
    with proper.user_context(model, [0, 5, -1, 2]):
        want = output_of(model, ids)
    with proper.user_context(loaded, [0, 5, -1, 2]):
        torch.testing.assert_close(output_of(loaded, ids), want)
