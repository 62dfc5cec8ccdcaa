"""fcmae: FCMAE pretraining of ConvNeXt V2 with a pure-PyTorch sparse encoder.

    fcmae.FCMAE, fcmae.create_model, fcmae.FCMAEConfig, fcmae.list_models   the model (fcmae.model, fcmae.config.model)
    fcmae.load, fcmae.load_model, fcmae.save_model                          files (fcmae.checkpoints)
    fcmae.convert, fcmae.exports, fcmae.data, fcmae.config, fcmae.training  the packages

Everything imports on first use (PEP 562), not with `import fcmae`: a command answers `--help` without waiting for
torch and timm, and `python -m fcmae.convert` finds its package not yet loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy_exports import lazy_exports

if TYPE_CHECKING:  # what __getattr__ imports, for type checkers and readers
    from .checkpoints import load, load_model, save_model
    from .config.model import FCMAEConfig, list_models
    from .encoder import SparseConvNeXtV2
    from .masking import random_mask
    from .model import FCMAE, create_model

__all__ = [
    "FCMAE", "FCMAEConfig", "SparseConvNeXtV2", "create_model", "list_models", "load", "load_model", "save_model",
    "random_mask",
]
__version__ = "0.1.0"

# name -> the module that defines it
_ATTRIBUTES = {
    "FCMAE": ".model", "create_model": ".model", "FCMAEConfig": ".config.model", "list_models": ".config.model",
    "SparseConvNeXtV2": ".encoder", "random_mask": ".masking", "load": ".checkpoints", "load_model": ".checkpoints",
    "save_model": ".checkpoints",
}
# `fcmae.FCMAE`, `from fcmae import load_model`, `fcmae.convert`, `fcmae.sparse`, ...: imported on first use
__getattr__, __dir__ = lazy_exports(__name__, _ATTRIBUTES, submodules=True)
