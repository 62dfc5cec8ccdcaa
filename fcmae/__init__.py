"""fcmae: FCMAE pretraining of ConvNeXt V2 with a pure-PyTorch sparse encoder."""

from .encoder import SparseConvNeXtV2
from .fcmae import FCMAE
from .masking import random_mask
from .models import create_model, list_models, load_model, save_model

__all__ = [
    "FCMAE", "SparseConvNeXtV2", "create_model", "list_models", "load_model", "save_model", "random_mask",
]
__version__ = "0.1.0"
