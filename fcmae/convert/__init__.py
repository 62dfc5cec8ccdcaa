"""Convert ConvNeXt V2 / FCMAE checkpoints between the official release, timm and this project.

One module per idea, in pipeline order:

    fcmae.checkpoints   reading every input format (`load`), and the key layouts (`detect_layout`, LAYOUTS)
    key_rules           the key table: official (MinkowskiEngine / dense) names <-> ours, renaming to ours
    fcmae.minkowski_kernels  MinkowskiEngine <-> dense kernel layout math (beside the backend that needs it)
    shapes              depths, dims, decoder and model name inferred from the weights
    conversion          `convert` / `to_timm` / `to_fcmae` / `save_conversion`

The command is fcmae.cli.convert's:
    python -m fcmae.convert INPUT OUTPUT --to {timm,fcmae,transformers,official} [--model NAME] [--no-strict] ...

Imported on first use (PEP 562): `python -m fcmae.convert --help` loads this package without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:  # what __getattr__ imports, for type checkers and readers
    from ..checkpoints.layouts import LAYOUTS, detect_layout
    from ..config.model import CUSTOM
    from ..minkowski_kernels import dense_conv_to_me, dense_depthwise_to_me, me_conv_to_dense, me_depthwise_to_dense
    from .conversion import TARGETS, Conversion, convert, load_checkpoint, save_conversion, to_fcmae, to_timm
    from .key_rules import KEY_TABLE, KeyRule, template_regex

# name -> the module that defines it
_ATTRIBUTES = {
    "LAYOUTS": "..checkpoints.layouts", "detect_layout": "..checkpoints.layouts",
    **dict.fromkeys(["TARGETS", "Conversion", "convert", "load_checkpoint", "save_conversion", "to_fcmae",
                     "to_timm"], ".conversion"),
    **dict.fromkeys(["dense_conv_to_me", "dense_depthwise_to_me", "me_conv_to_dense", "me_depthwise_to_dense"],
                    "..minkowski_kernels"),
    **dict.fromkeys(["KEY_TABLE", "KeyRule", "template_regex"], ".key_rules"),
    "CUSTOM": "..config.model",
}
__all__ = list(_ATTRIBUTES)

__getattr__, __dir__ = lazy_exports(__name__, _ATTRIBUTES)
