"""Convert ConvNeXt V2 / FCMAE checkpoints between the official release, timm and this project.

One module per idea, in pipeline order:

    fcmae.checkpoints   reading every input format (`load`), and the key layouts (`detect_layout`, LAYOUTS)
    key_rules           the key table: official (MinkowskiEngine / dense) names <-> ours, renaming to ours
    kernels             MinkowskiEngine <-> dense kernel layout math
    shapes              depths, dims, decoder and model name inferred from the weights
    conversion          `convert` / `to_timm` / `to_fcmae` / `save_conversion`
    cli                 fcmae-convert (`python -m fcmae.convert`); folders and the Hub are `fcmae.exports`

CLI:  python -m fcmae.convert INPUT OUTPUT --to {timm,fcmae,transformers,official} [--model NAME] [--no-strict] ...
"""

from ..checkpoints.layouts import LAYOUTS, detect_layout
from .cli import CLI_TARGETS, check_output, main
from .conversion import TARGETS, Conversion, convert, load_checkpoint, save_conversion, to_fcmae, to_timm
from .kernels import dense_conv_to_me, dense_depthwise_to_me, me_conv_to_dense, me_depthwise_to_dense
from .key_rules import KEY_TABLE, KeyRule, template_regex
from .shapes import CUSTOM

__all__ = [
    "LAYOUTS", "TARGETS", "CLI_TARGETS", "KEY_TABLE", "KeyRule", "Conversion", "load_checkpoint", "detect_layout",
    "convert", "to_timm", "to_fcmae", "save_conversion", "me_conv_to_dense", "dense_conv_to_me",
    "me_depthwise_to_dense", "dense_depthwise_to_me", "template_regex", "check_output", "CUSTOM", "main",
]
