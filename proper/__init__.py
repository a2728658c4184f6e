"""proper: PROPER-style personalized LLMs (population LoRA -> group LoRA experts with a
user-aware router -> per-user LoRA with a LoRA-aware router), fast to train and serve.

    import proper
    cfg = proper.ProperConfig(num_experts=8, top_k=2, rank=16, num_users=1000,
                              router=("token", "user", "lora"))
    model = proper.patch_model(hf_model, cfg)
    with proper.user_context(model, user_ids):   # one id per sequence, -1 = no row
        out = model(input_ids=...)
    out = model(input_ids=..., user_ids=user_ids)  # the same; also model.generate(..., user_ids=)

This package is the library a user imports: config, layer, patching, io, export, optim and
the transformers helpers (hf). It imports only ``proper_kernels`` and never imports the
training wing (``proper.train``) or the apps (``proper.apps``), which build on it
(``tests/test_wings.py`` walks the imports and checks it).
"""

from .config import ProperConfig
from .export import export_peft
from .io import AdapterFileError, load_adapters, load_config, save_adapters
from .layer import ProperLinear
from .optim import LazyAdamW
from .patching import (
    accept_user_ids,
    aux_losses,
    get_config,
    is_patched,
    merge,
    merge_and_unload,
    merged_loras,
    patch_model,
    proper_layers,
    set_backend,
    unload,
    unpatch,
    user_context,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "LazyAdamW",
    "ProperConfig",
    "ProperLinear",
    "accept_user_ids",
    "aux_losses",
    "export_peft",
    "get_config",
    "is_patched",
    "load_adapters",
    "load_config",
    "merge",
    "merge_and_unload",
    "merged_loras",
    "patch_model",
    "proper_layers",
    "save_adapters",
    "set_backend",
    "unload",
    "unpatch",
    "user_context",
]
