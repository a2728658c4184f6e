"""Pieces for transformers' Trainer and TRL's trainers.

A patched model takes ``user_ids=`` in its forward (``proper.patch_model``), so Trainer and
TRL need nothing special to train it; :class:`~proper.train.data.TrainerCollator` batches
proper's records. :class:`SaveAdaptersCallback` writes the adapters in proper's own format
(``save_adapters``: safetensors, checksummed, loadable by ``load_adapters``) into each
checkpoint Trainer saves, beside what Trainer writes::

    Trainer(model=patched, args=args, train_dataset=data, callbacks=[SaveAdaptersCallback()])
    # -> <output_dir>/checkpoint-<step>/proper/ ; proper.load_adapters(model, that directory)

TRL's SFTTrainer keeps only the columns it knows unless ``remove_unused_columns=False`` is
set in its config: set it, so that the user_ids column reaches the model.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from .io import save_adapters

ADAPTERS_DIR = "proper"  # the adapters' directory inside a Trainer checkpoint


class SaveAdaptersCallback(TrainerCallback):
    """On every checkpoint Trainer saves, also write the adapters to
    ``<output_dir>/checkpoint-<step>/proper`` with ``proper.save_adapters``."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is not None and state.is_world_process_zero:
            save_adapters(model, Path(args.output_dir) / f"checkpoint-{state.global_step}" / ADAPTERS_DIR)
        return control
