"""`load(path)`: the one entry point that reads any file or folder this project knows, and says what it found.

Kinds of input (`Loaded.kind`):

  "model file"             a safetensors file we wrote: pretrain.py's FCMAE model (config in its metadata),
                           finetune.py's classifier, or an fcmae-convert output.
  "run folder"             a pretrain.py / finetune.py OUTPUT_DIR: the model file it hands out, and its config.yaml.
  "training-state folder"  OUTPUT_DIR/checkpoints/step_N: Accelerate's weights, our trainer_state.json and the
                           run's config.yaml.
  "timm folder"            a folder `fcmae-convert --to timm` exported (model.safetensors + timm's config.json).
  "safetensors weights"    any other safetensors file: timm's, or an official layout.
  "torch file"             a torch.save file (.pt / .pth / .bin), bare or {'model': ...} / {'state_dict': ...}:
                           the official releases, timm's pytorch_model.bin. Read with weights_only=True.

The weights' key layout (`Loaded.layout`) is one of LAYOUTS (fcmae, timm, official-me, official-dense).
Anything else fails with one line that lists these kinds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config.model import FCMAEConfig
from ..config.yaml_files import load_yaml
from . import names
from .layouts import detect_layout, strip_wrappers
from .model_file import read_model_file
from .torch_file import read_torch_file

__all__ = ["KINDS", "KNOWN", "Loaded", "load"]

KINDS = ("model file", "run folder", "training-state folder", "timm folder", "safetensors weights", "torch file")
KNOWN = ("an fcmae model file (.safetensors), a pretrain.py/finetune.py output folder, a training-state folder "
         "(checkpoints/step_N), an exported timm folder, timm weights (.safetensors, .pth, .bin), or an official "
         "ConvNeXt V2 checkpoint (.pt/.pth, MinkowskiEngine or dense)")

@dataclass
class Loaded:
    """What `load` found.

    path:       the input as given.
    file:       the weights file actually read (inside a folder, the file within it).
    kind:       one of KINDS.
    layout:     the weights' key layout, one of LAYOUTS.
    state:      the weights (name -> tensor), wrapper prefixes (`module.`, `_orig_mod.`) removed.
    metadata:   the safetensors metadata, or {"args": JSON} of an official checkpoint's args.
    run_config: the training config (config.yaml) of the run or checkpoint it belongs to, if any.
    step:       a training-state folder's step; None otherwise.
    """

    path: Path
    file: Path
    kind: str
    layout: str
    state: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    run_config: dict[str, Any] | None = None
    step: int | None = None

    @property
    def model_config(self) -> FCMAEConfig | None:
        """The FCMAE model config this input records: its metadata's, or its pretraining run's; else None."""
        config = FCMAEConfig.from_metadata(self.metadata)
        if config is None and self.run_config:
            config = FCMAEConfig.from_run_config(self.run_config)
        return config

    def what(self) -> str:
        """What the input is, in words, for messages: "a fine-tuning run's training-state folder", "a torch file
        in the official-me layout", ..."""
        if self.model_config is not None:
            return f"an FCMAE {self.kind}"
        if self.run_config is not None:  # a run that trains no FCMAE model: finetune.py's
            return f"a fine-tuning run's {self.kind} (a classifier)"
        if self.metadata.get("format") == "timm":
            return "a timm classifier model file" if "classes" in self.metadata else "a timm model file"
        return f"a {self.kind} in the {self.layout} layout"

    def describe(self) -> str:
        return f"{self.path}: {self.kind}, {self.layout} layout, {len(self.state)} tensors"

def load(path: str | os.PathLike) -> Loaded:
    """Read any input listed in the module docstring, never unpickling arbitrary objects.

    Raises FileNotFoundError, or ValueError with one line: what is wrong, and the inputs it knows.
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file or folder; expected {KNOWN}")
    loaded = _load_file(path, path)
    run_dir = path.parent
    if path.name in names.RUN_MODELS and (run_dir / names.RUN_CONFIG).is_file():
        loaded.run_config = load_yaml(run_dir / names.RUN_CONFIG)
    return loaded

def _load_file(path: Path, file: Path) -> Loaded:
    if _looks_like_safetensors(file):
        state, metadata = read_model_file(file)
        ours = metadata.get("format") in ("fcmae", "timm")
        kind = "model file" if ours else "safetensors weights"
    else:
        state, metadata = read_torch_file(file)
        kind = "torch file"
    state = strip_wrappers(state)
    try:
        layout = detect_layout(state)
    except ValueError as e:
        raise ValueError(f"{file}: {e}; expected {KNOWN}") from None
    return Loaded(path, file, kind, layout, state, metadata)

def _load_folder(path: Path) -> Loaded:
    if (path / names.TRAINER_STATE).is_file():
        file = next((path / n for n in (names.ACCELERATE_WEIGHTS, names.ACCELERATE_WEIGHTS_PICKLE)
                     if (path / n).is_file()), None)
        if file is None:
            raise ValueError(f"{path} is a training-state folder without weights ({names.ACCELERATE_WEIGHTS})")
        loaded = _load_file(path, file)
        loaded.kind = "training-state folder"
        loaded.run_config = load_yaml(path / names.RUN_CONFIG) if (path / names.RUN_CONFIG).is_file() else None
        try:
            loaded.step = int(json.loads((path / names.TRAINER_STATE).read_text())["step"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} has a damaged {names.TRAINER_STATE}") from None
        return loaded
    model = names.run_model_file(path)
    if model is not None and (path / names.RUN_CONFIG).is_file():
        loaded = _load_file(path, model)
        loaded.kind, loaded.run_config = "run folder", load_yaml(path / names.RUN_CONFIG)
        return loaded
    config_json = path / names.EXPORT_CONFIG
    if config_json.is_file() and (path / names.EXPORT_WEIGHTS).is_file():
        try:
            exported = json.loads(config_json.read_text())
        except (ValueError, OSError):
            exported = {}
        if "architecture" in exported:
            loaded = _load_file(path, path / names.EXPORT_WEIGHTS)
            loaded.kind = "timm folder"
            return loaded
        if exported.get("model_type") == "convnextv2":
            raise ValueError(f"{path} is a transformers folder: load it with transformers' "
                             "ConvNextV2Model.from_pretrained; fcmae reads the file it was exported from")
    if model is not None:  # a folder holding a model file but no run config: read the file
        return _load_file(path, model)
    if (path / names.ACCELERATE_WEIGHTS_PICKLE).is_file():
        return _load_file(path, path / names.ACCELERATE_WEIGHTS_PICKLE)
    raise ValueError(f"{path} is a folder without weights this project reads; expected {KNOWN}")

def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return path.suffix == ".safetensors" or head[8:9] == b"{"
