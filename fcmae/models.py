"""The ConvNeXt V2 family: names, stage depths and widths, and `create_model`. Model files: fcmae.checkpoints."""

from __future__ import annotations

import inspect
from typing import Any

from .fcmae import FCMAE

__all__ = ["MODEL_SIZES", "list_models", "create_model", "resolve_name"]

# name: (depths, dims), from the ConvNeXt V2 paper; the names are timm's.
MODEL_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "convnextv2_atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "convnextv2_femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "convnextv2_pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "convnextv2_nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "convnextv2_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnextv2_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnextv2_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnextv2_huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


def list_models() -> list[str]:
    """The model names `create_model` accepts (short forms such as "atto" work too)."""
    return list(MODEL_SIZES)


def resolve_name(name: str) -> str:
    """'atto' or 'convnextv2_atto' -> 'convnextv2_atto'; ValueError for an unknown name."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string such as 'convnextv2_atto', got {name!r}")
    full = name if name.startswith("convnextv2_") else f"convnextv2_{name}"
    if full not in MODEL_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_SIZES)}")
    return full


def create_model(name: str = "convnextv2_atto", **overrides: Any) -> FCMAE:
    """Build an FCMAE model by name.

    Overrides: img_size (224), patch_size (32), mask_ratio (0.6), decoder_depth (1), decoder_embed_dim (512),
    norm_pix_loss (True), drop_path_rate (0.0), backend ("sparse"), init ("timm" or "official"), and depths / dims
    for a custom size.
    """
    name = resolve_name(name)
    valid = [p for p in inspect.signature(FCMAE).parameters if p != "name"]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for create_model; valid: {', '.join(valid)}")
    depths, dims = MODEL_SIZES[name]
    kwargs: dict[str, Any] = dict(depths=depths, dims=dims)
    kwargs.update(overrides)
    return FCMAE(name=name, **kwargs)
