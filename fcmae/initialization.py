"""Two ways to initialize an FCMAE model: timm's ConvNeXt V2 init, or the official FCMAE pretraining re-init.

  "timm"      truncated normal std 0.02 on every conv and linear weight (cut at +-2, i.e. never), zero biases;
              LayerNorm 1 / 0, GRN 0 / 0, mask token normal std 0.02. What timm and most ports use.
  "official"  what the official PyTorch `fcmae.py` (`FCMAE._init_weights`) does to the whole model after it is
              built: timm's `trunc_normal_` at its default std 1.0 (cut at +-2) on the stem conv, every
              depthwise conv (encoder and decoder), the encoder's MLP linears, the decoder's projection and
              prediction convs; std 0.02 on the downsampling convs; PyTorch's default init on the decoder
              block's dense linears (no branch of the official function matches them); zero biases; LayerNorm
              1 / 0, GRN 0 / 0, mask token normal std 0.02.

The released official weights were trained by the authors' JAX code, whose init is not published. Which one
`fcmae.create_model` uses by default was chosen with `benchmarks/probe.py` (see docs/finetuning.md, "Initialization").
"""

from __future__ import annotations

from timm.layers import trunc_normal_
from timm.layers.grn import GlobalResponseNorm
from torch import nn

from .config.model import INIT_SCHEMES

__all__ = ["INIT_SCHEMES", "init_timm", "initialize"]

OFFICIAL_STD = 1.0  # timm's trunc_normal_ default, which the official code calls without a std
DOWNSAMPLE_STD = 0.02  # the official MinkowskiConvolution branch


def init_timm(module: nn.Module) -> None:
    """timm's ConvNeXt V2 init of one module (use with `model.apply`): weights std 0.02, zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def initialize(model: nn.Module, scheme: str = "timm") -> None:
    """Initialize an FCMAE model (`model.encoder`, `model.decoder`) in place with one of INIT_SCHEMES."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}")
    if scheme == "timm":  # the encoder already set it when built: only the decoder is drawn here
        model.decoder.apply(init_timm)
    else:
        _init_official(model)
    nn.init.normal_(model.decoder.mask_token, std=0.02)


def _init_official(model: nn.Module) -> None:
    encoder, decoder = model.encoder, model.decoder
    downsample = {id(stage.downsample[1]) for stage in encoder.stages if isinstance(stage.downsample, nn.Sequential)}
    decoder_linears = {id(m) for m in decoder.modules() if isinstance(m, nn.Linear)}
    for module in model.modules():
        if id(module) in decoder_linears:
            module.reset_parameters()  # PyTorch's default: kaiming-uniform weight, uniform bias
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            # Drawn iid, so this equals the official trunc_normal_ on weight.view(out, -1).
            trunc_normal_(module.weight, std=DOWNSAMPLE_STD if id(module) in downsample else OFFICIAL_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):  # timm's LayerNorm and LayerNorm2d are nn.LayerNorm subclasses
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, GlobalResponseNorm):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
