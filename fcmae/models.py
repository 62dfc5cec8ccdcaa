"""`create_model`, and the model files of FCMAE models (the sizes and their names live in `fcmae.model_config`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from .fcmae import FCMAE
from .model_config import MODEL_FORMAT, MODEL_SIZES, FCMAEConfig, list_models, resolve_name

__all__ = [
    "MODEL_SIZES", "list_models", "create_model", "resolve_name", "save_model", "load_model", "read_model_file",
    "load_state_dict_strict", "format_keys", "write_safetensors", "FCMAEConfig", "MODEL_FORMAT",
]


def create_model(name: str = "convnextv2_atto", **overrides: Any) -> FCMAE:
    """Build an FCMAE model by name: `FCMAE(FCMAEConfig(name, **overrides))`.

    Overrides are FCMAEConfig's fields: img_size (224), patch_size (32), in_chans (3), mask_ratio (0.6),
    decoder_depth (1), decoder_embed_dim (512), norm_pix_loss (True), drop_path_rate (0.0), backend ("sparse"),
    init ("timm" or "official"), and depths / dims for a custom size. A bad one raises a one-line ConfigError.
    """
    return FCMAE(FCMAEConfig.from_dict({"name": name, **overrides}, source="create_model's settings"))


# Model files -------------------------------------------------------------------------------------------------

def save_model(model: FCMAE, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the model's weights to a safetensors file, with its config in the metadata (`load_model` reads it).

    The write is atomic: a crash mid-save leaves any earlier file at `path` intact.
    """
    meta = {**model.config.to_metadata(), **(metadata or {})}
    write_safetensors(model.state_dict(), path, meta)


def write_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write tensors to a safetensors file atomically (a temporary file, then a rename).

    A failure (missing folder, a folder at `path`, no permission, full disk) raises OSError with a one-line
    reason, removes the temporary file and leaves any earlier file at `path` as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name such as {path / 'model.safetensors'}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no such folder for {path.name}: {path.parent}")
    tmp = path.with_name(path.name + ".tmp")
    try:
        safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp),
                                    metadata=metadata)
        os.replace(tmp, path)
    except Exception as e:  # safetensors reports I/O failures as its own error type
        tmp.unlink(missing_ok=True)
        raise OSError(f"could not write {path}: {str(e).strip().splitlines()[0]}") from None


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a safetensors file; ValueError with a one-line reason if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such model file: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    return state, metadata


def load_model(path: str | os.PathLike, **overrides: Any) -> FCMAE:
    """Rebuild an FCMAE model from a file written by `save_model` (e.g. pretrain.py's model.safetensors).

    Overrides change settings that keep the weights' shapes: backend, mask_ratio, img_size, norm_pix_loss,
    drop_path_rate. Anything that does not fit the stored weights fails with the offending keys.
    """
    state, metadata = read_model_file(path)
    config = FCMAEConfig.from_metadata(metadata)
    if config is None:
        raise ValueError(f"{path} is not an fcmae model file (no fcmae config in its metadata); "
                         "use `python -m fcmae.convert` for official or timm checkpoints")
    if "name" in overrides:
        raise ValueError("load_model cannot change the model name; it comes from the file")
    model = FCMAE(config.replace(**overrides))
    load_state_dict_strict(model, state, source=str(path))
    return model


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """load_state_dict that reports every missing, unexpected and mis-shaped key in one ValueError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    problems = [f"missing {format_keys(missing)}" if missing else "",
                f"unexpected {format_keys(unexpected)}" if unexpected else "",
                f"shape mismatch {format_keys(shapes)}" if shapes else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"{source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state)


def format_keys(items: list[str], limit: int = 8) -> str:
    """'3 key(s): a, b, c' with at most `limit` shown: error messages list offending keys this way."""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} key(s): " + ", ".join(items[:limit]) + more
