"""`create_model` (the sizes and their names live in `fcmae.model_config`; model files in `fcmae.checkpoints`)."""

from __future__ import annotations

from typing import Any

from .fcmae import FCMAE
from .model_config import MODEL_SIZES, FCMAEConfig, list_models, resolve_name

__all__ = ["MODEL_SIZES", "list_models", "create_model", "resolve_name", "FCMAEConfig"]


def create_model(name: str = "convnextv2_atto", **overrides: Any) -> FCMAE:
    """Build an FCMAE model by name: `FCMAE(FCMAEConfig(name, **overrides))`.

    Overrides are FCMAEConfig's fields: img_size (224), patch_size (32), in_chans (3), mask_ratio (0.6),
    decoder_depth (1), decoder_embed_dim (512), norm_pix_loss (True), drop_path_rate (0.0), backend ("sparse"),
    init ("timm" or "official"), and depths / dims for a custom size. A bad one raises a one-line ConfigError.
    """
    return FCMAE(FCMAEConfig.from_dict({"name": name, **overrides}, source="create_model's settings"))
