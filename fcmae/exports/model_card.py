"""The README.md model card of an exported folder: Hub front matter, what the model is, where it came from, how it
was trained (the settings the run's config records) and what the run measured, how to preprocess, and how to load it.

The card goes to the Hub with the folder (`--push-to-hub`): it names the input by its file name and SHA-256, never by
where it lay on this machine (see `source_info`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..convert import Conversion
from .source_info import SourceInfo

__all__ = ["render_card"]

_LOAD = {
    "timm": ('import timm\n\nmodel = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)  '
             '# or "hf-hub:USER/REPO" once pushed\n'
             'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True, num_classes=10)  '
             '# a fresh head\n'
             'features = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True, features_only=True)  '
             '# strides 4-32\n'
             'data_config = timm.data.resolve_data_config(model=model)\n'
             'transform = timm.data.create_transform(**data_config)'),
    "transformers": ('from transformers import AutoImageProcessor, ConvNextV2ForImageClassification, ConvNextV2Model\n\n'
                     'processor = AutoImageProcessor.from_pretrained("PATH/TO/THIS/FOLDER")  # or "USER/REPO"\n'
                     'model = {cls}.from_pretrained("PATH/TO/THIS/FOLDER")\n'
                     'outputs = model(**processor(images, return_tensors="pt"))'),
}


def render_card(conversion: Conversion, info: SourceInfo, library: str, num_classes: int) -> str:
    """The model card text for a `library` ("timm" or "transformers") folder of `conversion`."""
    config = conversion.config
    named = conversion.name != "custom" and "depths" not in conversion.timm_kwargs
    size = conversion.name.removeprefix("convnextv2_") if named else "(custom size)"
    head = (f"a {num_classes}-class classifier" + (f" ({_classes(info.class_names)})" if info.class_names else "")
            if num_classes else "no classifier (an image encoder: pooled features or feature maps)")
    tags = [library, "convnextv2", "fcmae", "image-classification" if num_classes else "image-feature-extraction"]
    front = ["---", f"library_name: {library}", "tags:", *[f"- {t}" for t in tags],
             f"pipeline_tag: {tags[-1]}"]
    if info.official:
        front.append("license: cc-by-nc-4.0")
    front.append("---")

    local = Path(conversion.source).resolve().name
    notes = [note.replace(conversion.source, local) for note in conversion.notes]  # they name the input's path
    lines = [*front, "", f"# ConvNeXt V2 {size}, FCMAE" + (" + fine-tuned" if info.finetune else ""), "",
             f"A ConvNeXt V2 encoder (depths {_csv(config['depths'])}, dims {_csv(config['dims'])}) with {head}, "
             f"pretrained with FCMAE (fully convolutional masked autoencoder, Woo et al. 2023). Exported for "
             f"{library} by `fcmae-convert`.", "",
             "## Source", "", "| | |", "|---|---|",
             f"| input | `{info.name}` ({info.kind}) |"]
    if info.sha256:
        lines.append(f"| SHA-256 | `{info.sha256}` |")
    lines.append(f"| layout | {conversion.layout} |")
    lines += [f"| {k} | {v} |" for k, v in info.provenance.items()]
    lines += [f"| conversion | {note} |" for note in notes]
    if info.official:
        lines += ["", "The weights come from the official ConvNeXt V2 release, licensed CC-BY-NC 4.0 (non-commercial)."]
    for title, settings in (("Pretraining settings (FCMAE)", info.pretrain), ("Fine-tuning settings", info.finetune)):
        if settings:
            lines += ["", f"## {title}", "", "| setting | value |", "|---|---|"]
            lines += [f"| {k} | {_value(v)} |" for k, v in settings.items()]
    lines += ["", "## Metrics", ""]
    if info.metrics:
        lines += ["| what the run recorded | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in info.metrics.items()]
    else:
        lines.append("The input records no metrics.")
    data = info.preprocessing
    lines += ["", "## Preprocessing", "",
              f"Input {data['input_size'][1]}x{data['input_size'][2]}, resize by 1/{data['crop_pct']} then center crop, "
              f"{data['interpolation']} interpolation, mean {_floats(data['mean'])}, std {_floats(data['std'])}: what "
              "`finetune.py` evaluates with (torchvision `Resize` and `CenterCrop`)."]
    if library == "transformers":
        lines += ["", _transformers_preprocessing(max(data["input_size"][1:]))]
    lines += ["", "## Use", "", "```python",
              _LOAD[library].format(cls="ConvNextV2ForImageClassification" if num_classes else "ConvNextV2Model"),
              "```", ""]
    return "\n".join(lines)


def _transformers_preprocessing(size: int) -> str:
    """How transformers' ConvNextImageProcessor (preprocessor_config.json) differs from finetune.py's transform."""
    if size >= 384:  # ConvNextImageProcessor's own rule: no crop from 384 px up
        return (f"`preprocessor_config.json` does not match `finetune.py` at this size: transformers' "
                f"`ConvNextImageProcessor` ignores `crop_pct` from 384 px up and resizes the whole image to "
                f"{size}x{size} (no crop, the aspect ratio not kept). Preprocess as above yourself to match it.")
    return ("`preprocessor_config.json` sets transformers' `ConvNextImageProcessor` to the same resize, crop, mean "
            "and std, but not pixel for pixel: where the resized image is longer than the crop by 3, 7, 11, ... "
            "pixels on a side (margin mod 4 = 3), transformers crops from margin // 2 and torchvision one pixel "
            "further (it rounds margin / 2 half to even), so the input shifts by one pixel on that side (on a "
            "600x400 photo at 96 px, normalized values differ by up to 3.6). Otherwise only the resize kernels "
            "differ (normalized values within 0.02). This depends on each image's size, square images included.")


def _classes(names: list[str] | None, limit: int = 10) -> str:
    if not names:
        return ""
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _csv(values: list[int]) -> str:
    return ",".join(map(str, values))


def _floats(values: Any) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
    return text.replace("|", "\\|")
