"""A Hub-ready timm folder: `model.safetensors`, timm's `config.json` and a model card `README.md`.

timm builds and loads it in one line through its `local-dir:` source (checked on timm 1.0.31):

    model = timm.create_model("local-dir:FOLDER", pretrained=True)                  # as exported
    model = timm.create_model("local-dir:FOLDER", pretrained=True, num_classes=10)  # a fresh 10-class head
    model = timm.create_model("hf-hub:USER/REPO", pretrained=True)                  # once pushed to the Hub

`config.json` is timm's Hub format: `architecture`, `num_classes`, `num_features`, `global_pool`, `model_args`
(the depths, dims and conv_mlp that differ from the named architecture) and `pretrained_cfg` (input_size,
interpolation, crop_pct, crop_mode, mean, std, pool_size, first_conv, classifier), plus `label_names` when the
weights have a classifier whose class names are known.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoints import names, write_safetensors
from ..config.model import total_stride
from ..convert import Conversion
from .model_card import render_card
from .source_info import SourceInfo

__all__ = ["timm_config", "complete_head_norm", "write_timm_folder"]


def complete_head_norm(conversion: Conversion) -> dict[str, Tensor]:
    """The timm weights with the final LayerNorm (`head.norm`) that FCMAE pretraining has none of filled in as a
    fresh one (weight 1, bias 0: what timm builds), so the folder loads strictly. Notes it in `conversion.notes`."""
    state = dict(conversion.state)
    if "head.norm.weight" not in state:
        width = conversion.config["dims"][-1]
        state["head.norm.weight"], state["head.norm.bias"] = torch.ones(width), torch.zeros(width)
        conversion.notes.append("no final LayerNorm in the input (FCMAE pretraining has none): wrote a fresh one "
                                "(weight 1, bias 0), as timm and transformers build it")
    return state


def timm_config(conversion: Conversion, info: SourceInfo, num_classes: int) -> dict[str, Any]:
    """timm's config.json for these weights (the format `timm.create_model('local-dir:...')` reads)."""
    data = info.preprocessing
    height, width = data["input_size"][1:]
    stride = total_stride(conversion.config["depths"])
    pretrained_cfg = {
        "tag": "fcmae_ft" if info.finetune else "fcmae", "custom_load": False, **data,
        "fixed_input_size": False, "num_classes": num_classes, "pool_size": (height // stride, width // stride),
        "first_conv": "stem.0", "classifier": "head.fc",
    }
    if info.official:
        pretrained_cfg["license"] = "cc-by-nc-4.0"
    config: dict[str, Any] = {"architecture": conversion.timm_name, "num_classes": num_classes,
                              "num_features": conversion.config["dims"][-1], "global_pool": "avg"}
    if conversion.timm_kwargs:
        config["model_args"] = {k: list(v) if isinstance(v, tuple) else v for k, v in conversion.timm_kwargs.items()}
    if info.class_names and len(info.class_names) == num_classes:
        config["label_names"] = list(info.class_names)
    config["pretrained_cfg"] = pretrained_cfg
    return config


def write_timm_folder(conversion: Conversion, info: SourceInfo, folder: Path) -> None:
    """Write model.safetensors, config.json and README.md into `folder` (an existing, empty folder)."""
    state = complete_head_norm(conversion)
    num_classes = state["head.fc.weight"].shape[0] if "head.fc.weight" in state else 0
    metadata = {"format": "pt", "model": conversion.name, "source": info.name, "layout": conversion.layout}  # no path
    write_safetensors(state, folder / names.EXPORT_WEIGHTS, metadata)
    config = timm_config(conversion, info, num_classes)
    (folder / names.EXPORT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (folder / names.MODEL_CARD).write_text(render_card(conversion, info, "timm", num_classes))
