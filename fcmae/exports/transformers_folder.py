"""A Hugging Face transformers folder: `ConvNextV2Model` / `ConvNextV2ForImageClassification` weights, config.json,
preprocessor_config.json (so `AutoImageProcessor` works) and a model card.

The two traps of a hand-made port, both handled here:
  - transformers' final LayerNorm uses `config.layer_norm_eps`, 1e-12 by default, where timm and the official model
    use 1e-6 (every other LayerNorm of transformers' ConvNeXt V2 has 1e-6 built in): config.json sets 1e-6.
  - GRN gamma and beta are (1, 1, 1, 4C) there, (4C,) in timm.

Weights without a classifier are written as a `ConvNextV2Model` (keys without prefix; config.json with `num_labels`
0 and no `id2label`, so that `ConvNextV2ForImageClassification` also loads them with no missing key, its classifier
an Identity, and `from_pretrained(FOLDER, num_labels=K)` adds a fresh K-class head without a warning); with a
classifier, as a `ConvNextV2ForImageClassification` (`convnextv2.*` and `classifier.*`, `id2label` from the class
names a fine-tuned file records). The weights are checked against transformers' own model (strict) before anything
is written.

`preprocessor_config.json` is transformers' `ConvNextImageProcessor` with finetune.py's evaluation settings. It does
what finetune.py does up to a one-pixel crop offset on some image sizes, below 384 px; from 384 px up it resizes to a
square without a crop (its own rule), which the export notes. The model card says both (`model_card`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoints import names
from ..convert import Conversion
from .model_card import render_card
from .source_info import SourceInfo
from .timm_folder import complete_head_norm

__all__ = ["LAYER_NORM_EPS", "TIMM_TO_TRANSFORMERS", "to_transformers_names", "write_transformers_folder"]

LAYER_NORM_EPS = 1e-6

# timm name (regex) -> transformers ConvNextV2Model name; head.fc becomes the classification model's `classifier`.
TIMM_TO_TRANSFORMERS: tuple[tuple[str, str], ...] = (
    (r"stem\.0\.", "embeddings.patch_embeddings."),
    (r"stem\.1\.", "embeddings.layernorm."),
    (r"stages\.(\d+)\.downsample\.([01])\.", r"encoder.stages.\1.downsampling_layer.\2."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"encoder.stages.\1.layers.\2.dwconv."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"encoder.stages.\1.layers.\2.layernorm."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc([12])\.", r"encoder.stages.\1.layers.\2.pwconv\3."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.grn\.", r"encoder.stages.\1.layers.\2.grn."),
    (r"head\.norm\.", "layernorm."),
    (r"head\.fc\.", "classifier."),
)
_RULES = [(re.compile(pattern), replacement) for pattern, replacement in TIMM_TO_TRANSFORMERS]


def to_transformers_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ConvNeXt V2 weights (Linear MLP) -> transformers names and shapes; `convnextv2.` prefixes the model's
    keys when there is a classifier. Raises ValueError for a key no rule knows."""
    with_head = "head.fc.weight" in state
    out, unknown = {}, []
    for key, value in state.items():
        rule = next(((rx, rep) for rx, rep in _RULES if rx.match(key)), None)
        if rule is None:
            unknown.append(key)
            continue
        name = rule[0].sub(rule[1], key, count=1)
        if ".grn." in name:
            value = value.reshape(1, 1, 1, -1)
        if with_head and not name.startswith("classifier."):
            name = "convnextv2." + name
        out[name] = value
    if unknown:
        raise ValueError(f"no transformers name for {', '.join(unknown[:8])}")
    return out


def transformers_config(conversion: Conversion, info: SourceInfo, num_labels: int) -> dict[str, Any]:
    """The keyword arguments of `transformers.ConvNextV2Config` for these weights."""
    kwargs: dict[str, Any] = dict(depths=list(conversion.config["depths"]), hidden_sizes=list(conversion.config["dims"]),
                                  layer_norm_eps=LAYER_NORM_EPS, image_size=info.img_size[0], num_channels=3)
    if num_labels and info.class_names and len(info.class_names) == num_labels:
        kwargs["id2label"] = dict(enumerate(info.class_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(info.class_names)}
    else:
        kwargs["num_labels"] = num_labels
    return kwargs


def write_transformers_folder(conversion: Conversion, info: SourceInfo, folder: Path) -> None:
    """Write the transformers model, its image processor config and README.md into `folder`.

    Needs `transformers`. The input must be a Linear-MLP timm conversion (`convert(..., conv_mlp=False)`).
    """
    transformers = _import_transformers()
    state = to_transformers_names(complete_head_norm(conversion))
    num_labels = state["classifier.weight"].shape[0] if "classifier.weight" in state else 0
    config = transformers.ConvNextV2Config(**transformers_config(conversion, info, num_labels))
    cls = transformers.ConvNextV2ForImageClassification if num_labels else transformers.ConvNextV2Model
    with torch.device("meta"):  # no memory for a second copy of the weights, and no random init to throw away
        model = cls(config)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{conversion.source} does not fit transformers' {cls.__name__}: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, shape mismatch {shapes[:4]}")
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    model.save_pretrained(folder, safe_serialization=True)
    if not num_labels:
        _without_label_map(folder / names.EXPORT_CONFIG)

    height, width = info.img_size
    data = info.preprocessing
    if height != width:
        conversion.notes.append(f"the model was trained at {height}x{width}; transformers' ConvNextImageProcessor "
                                f"crops squares: preprocessor_config.json asks for {max(height, width)} px")
    if max(height, width) >= 384:
        conversion.notes.append(f"transformers' ConvNextImageProcessor resizes to {max(height, width)}x"
                                f"{max(height, width)} without a center crop from 384 px up: preprocessor_config.json "
                                "does not preprocess as finetune.py evaluates (the model card says how to)")
    processor = transformers.ConvNextImageProcessor(
        do_resize=True, size={"shortest_edge": max(height, width)}, crop_pct=data["crop_pct"], resample=3,  # bicubic
        do_rescale=True, do_normalize=True, image_mean=list(data["mean"]), image_std=list(data["std"]))
    processor.save_pretrained(folder)
    (folder / names.MODEL_CARD).write_text(render_card(conversion, info, "transformers", num_labels))


def _without_label_map(config_file: Path) -> None:
    """An encoder without a classifier: config.json with `num_labels` 0 in place of transformers' `"id2label": {}`.

    With an empty map, `from_pretrained(FOLDER, num_labels=K)` warns that K "is incompatible to the id2label map of
    length 0"; with `num_labels` and no map (read so by transformers 4.x and 5.x), K replaces 0 quietly, and without K
    the classifier stays an Identity (0 labels) rather than a fresh 2-class head.
    """
    config = json.loads(config_file.read_text())
    config.pop("id2label", None)
    config.pop("label2id", None)
    config["num_labels"] = 0
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ValueError("--to transformers needs the transformers package: pip install 'transformers>=4.40'") from None
    return transformers
