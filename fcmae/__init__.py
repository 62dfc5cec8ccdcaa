"""fcmae: FCMAE pretraining of ConvNeXt V2 with a pure-PyTorch sparse encoder."""

import importlib

from .encoder import SparseConvNeXtV2
from .fcmae import FCMAE
from .masking import random_mask
from .checkpoints import load, load_model, save_model
from .model_config import FCMAEConfig
from .models import create_model, list_models

__all__ = [
    "FCMAE", "FCMAEConfig", "SparseConvNeXtV2", "create_model", "list_models", "load", "load_model", "save_model",
    "random_mask",
]
__version__ = "0.1.0"

_SUBMODULES = ("convert", "visualize", "data", "config", "training", "layer_decay", "evaluation", "linear_probe",
               "checkpoints")


def __getattr__(name: str):
    """`fcmae.convert`, `fcmae.visualize`, ... after a plain `import fcmae`. Imported on first use, not up front:
    an eager import would make `python -m fcmae.convert` warn that the module was already loaded."""
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fcmae' has no attribute {name!r}")
