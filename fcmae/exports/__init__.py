"""Exports of a converted model for other tools: `fcmae-convert --to transformers|official`, and `--to timm` into a
Hub-ready folder.

  source_info.py          what the input is and what its run recorded (settings, metrics, class names, input size)
  model_card.py           the README.md model card of an exported folder
  timm_folder.py          a folder timm loads with `create_model("local-dir:FOLDER", pretrained=True)`
  transformers_folder.py  a folder `transformers.ConvNextV2Model` / `ConvNextV2ForImageClassification` load
  official_layout.py      the official ConvNeXt V2 dense layout (`downsample_layers.*`, `stages.*`)
  hub.py                  uploading a folder to the Hugging Face Hub
  targets.py              `export`: which target an output is, and writing it (what `fcmae-convert` calls)

Every export starts from `fcmae.convert.convert(..., "timm")`: one loader, one layout detection and one set of
checks for every input the converter reads. Output folders are checked and written atomically by
`fcmae.checkpoints.output`, as every other file fcmae writes.
"""

from .targets import export

__all__ = ["export"]
