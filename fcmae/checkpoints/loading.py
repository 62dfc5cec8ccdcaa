"""`load_model`: an FCMAE model rebuilt from whatever `load` reads that records an FCMAE config."""

from __future__ import annotations

import os
from typing import Any

from ..model import FCMAE
from .formats import load
from .model_file import load_state_dict_strict

__all__ = ["load_model"]


def load_model(path: str | os.PathLike, **overrides: Any) -> FCMAE:
    """Rebuild an FCMAE model from a model file written by `save_model` (pretrain.py's fcmae_model.safetensors),
    a pretraining run folder, or one of its training-state folders (checkpoints/step_N).

    Overrides change settings that keep the weights' shapes: backend, mask_ratio, img_size, norm_pix_loss,
    drop_path_rate. Anything that does not fit the stored weights fails with the offending keys.
    """
    loaded = load(path)
    config = loaded.model_config
    if config is None:
        raise ValueError(f"{path} is {loaded.what()}, not an FCMAE model (it records no FCMAE config); "
                         "`fcmae-convert --to fcmae` builds one from official or timm weights")
    if "name" in overrides:
        raise ValueError("load_model cannot change the model name; it comes from the file")
    model = FCMAE(config.replace(**overrides))
    load_state_dict_strict(model, loaded.state, source=str(loaded.file))
    return model
