"""Our model files: safetensors with the model's FCMAEConfig in the metadata (`save_model`), written atomically
with the file mode the umask gives; and the strict state-dict check every loader reports mismatches with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import safetensors
import safetensors.torch
import torch
from torch import nn

from .output import write_file_atomically

__all__ = ["save_model", "write_safetensors", "read_model_file", "load_state_dict_strict", "format_keys"]


def save_model(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write an FCMAE model's weights to a safetensors file, its config in the metadata (`load_model` reads it).

    The write is atomic: a crash mid-save leaves any earlier file at `path` intact.
    """
    write_safetensors(model.state_dict(), path, {**model.config.to_metadata(), **(metadata or {})})


def write_safetensors(state: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write tensors to a safetensors file atomically (a temporary file, then a rename).

    The file gets the mode the umask gives (safetensors' own temporary file would leave it 0600). A failure (a
    folder at `path`, no permission, full disk) raises OSError with a one-line reason and the fix, removes the
    temporary file and leaves any earlier file at `path` as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name such as {path / 'model.safetensors'}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    write_file_atomically(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))


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


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
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
