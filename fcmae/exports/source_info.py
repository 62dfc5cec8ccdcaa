"""What an input of `fcmae-convert` is and what its run recorded, for model cards and preprocessing configs.

A pretraining run folder (pretrain.py's output dir) holds `fcmae_model.safetensors`, `config.yaml` and `metrics.jsonl`;
a checkpoint `checkpoints/step_N/` holds `config.yaml` and `trainer_state.json`, with the run's metrics two levels
up; a fine-tuning run holds `classifier.safetensors` (`model.safetensors` in older runs), which records the
accuracies and class names in its metadata, while its config names the pretrained weights it started from (whose run is read as well). An
official checkpoint records its training arguments inside the file. Nothing here is required: what is missing or
unreadable is simply not reported.

Model cards go to the Hub with the folder, so nothing here records where a file lay on this machine: the input is
named by its file name (and its folder's name for a folder input) with its SHA-256, a setting that names a local
path by its last component (with the SHA-256 of a file it names, e.g. `finetune`'s pretrained weights).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..checkpoints import Loaded
from ..checkpoints.names import METRICS, RUN_CONFIG, TRAINER_STATE
from ..config.model import FCMAEConfig
from ..config.training_configs import flat_settings
from ..config.yaml_files import load_yaml
from ..convert import Conversion

__all__ = ["SourceInfo", "describe_source", "RUN_CONTROL_KEYS"]

# Config keys that say how a run was driven, not what it learned: left off model cards.
RUN_CONTROL_KEYS = frozenset({
    "output_dir", "resume", "save_every", "keep_last", "log_every", "log_with", "num_workers", "vis_every", "eval",
    # official argparse names
    "log_dir", "device", "dist_url", "world_size", "rank", "local_rank", "gpu", "pin_mem", "start_epoch",
    "save_ckpt", "save_ckpt_freq", "save_ckpt_num", "dist_on_itp", "auto_resume", "distributed", "dist_eval",
    "disable_eval", "enable_wandb", "wandb_ckpt", "project",
})
EVAL_CROP_PCT = 0.875  # finetune.py evaluates with resize max(size) / 0.875, then a center crop


@dataclass
class SourceInfo:
    """What an export's model card and preprocessing config say about the input.

    path:         the input as given (a local path: never written into an export).
    name:         the input's name without its location: the file name; for a folder, the folder's name and the
                  weights file read inside it (e.g. `step_00000002/model.safetensors`).
    sha256:       the SHA-256 (hex) of the weights file read; None when there is none to read.
    kind:         "pretraining run", "pretraining checkpoint", "fine-tuning run", "official pretraining checkpoint",
                  "official fine-tuned checkpoint", "timm weights" or "model file".
    pretrain:     the FCMAE pretraining settings (config.yaml, or an official checkpoint's args); {} if unknown.
    finetune:     the fine-tuning settings; {} for a model that was not fine-tuned here or is unknown.
    metrics:      label -> value, what the run(s) recorded, in reading order.
    class_names:  the classifier's class names, where the file records them.
    img_size:     (H, W) the model was last trained or evaluated at (as FCMAEConfig.img_size).
    official:     the weights come from the official ConvNeXt V2 release (licensed CC-BY-NC 4.0).
    provenance:   label -> value, what the file's metadata says about where it came from.
    """

    path: str
    kind: str
    name: str = ""
    sha256: str | None = None
    pretrain: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    class_names: list[str] | None = None
    img_size: tuple[int, int] = (224, 224)
    official: bool = False
    provenance: dict[str, str] = field(default_factory=dict)

    @property
    def preprocessing(self) -> dict[str, Any]:
        """timm's data config of the model: what finetune.py evaluates with (bicubic, crop_pct 0.875, ImageNet
        mean and std; the pretraining augmentation normalizes the same way)."""
        return {"input_size": (3, *self.img_size), "interpolation": "bicubic", "crop_pct": EVAL_CROP_PCT,
                "crop_mode": "center", "mean": tuple(IMAGENET_DEFAULT_MEAN), "std": tuple(IMAGENET_DEFAULT_STD)}


def describe_source(loaded: Loaded, conversion: Conversion) -> SourceInfo:
    """Describe the input that `conversion` was made from (see the module docstring), from what `load` found there
    (`conversion.loaded`): its weights file, metadata and run config are not read again."""
    path, metadata, weights = loaded.path, loaded.metadata, loaded.file
    run_dir, config_file, step = _run_files(path)
    if loaded.run_config is not None:
        recorded = loaded.run_config
    else:  # a file in a run folder under a name the run does not write: its config.yaml still tells its settings
        recorded = _read_yaml(config_file) if config_file else {}
    config = flat_settings(recorded)  # the flags' spelling: `model: convnextv2_atto`, `mask_ratio: 0.6`
    name = f"{path.resolve().name}/{weights.name}" if path.is_dir() else path.name
    info = SourceInfo(str(path), "model file", name=name, sha256=_sha256(weights) if weights.is_file() else None)
    size = conversion.config.get("img_size")

    if "finetune" in config:
        info.kind = "fine-tuning run"
        info.finetune = _settings(config)
        info.metrics.update(_finetune_metrics(run_dir, metadata, step))
        pretrained = Path(str(config["finetune"])) if config.get("finetune") else None
        if pretrained is not None and pretrained.exists():
            pre_dir, pre_config, pre_step = _run_files(pretrained)
            info.pretrain = _settings(flat_settings(_read_yaml(pre_config))) if pre_config else {}
            info.metrics.update(_pretrain_metrics(pre_dir, pre_step))
        size = config.get("input_size", size)
    elif _trains_fcmae(recorded):
        info.kind = "pretraining checkpoint" if step is not None else "pretraining run"
        info.pretrain = _settings(config)
        info.metrics.update(_pretrain_metrics(run_dir, step))
        size = config.get("input_size", size)
    elif "args" in metadata:  # an official checkpoint: its argparse args
        args = json.loads(metadata["args"])
        pretraining = "mask_ratio" in args
        info.kind = f"official {'pretraining' if pretraining else 'fine-tuned'} checkpoint"
        (info.pretrain if pretraining else info.finetune).update(_settings(args))
        size = args.get("input_size", size)
    elif conversion.layout == "timm":
        info.kind = "timm weights"
    # A file fcmae-convert wrote records what it was converted from: official weights stay official.
    for key in ("source", "layout"):
        if key in metadata:
            info.provenance[f"converted from ({key})"] = _without_location(metadata[key])
    info.official = any(layout.startswith("official") for layout in (conversion.layout, metadata.get("layout", ""))) \
        or info.kind.startswith("official")

    if metadata.get("format") == "timm":  # finetune.py's model file
        if "classes" in metadata:
            info.class_names = [str(c) for c in json.loads(metadata["classes"])]
        for key in ("val_acc1", "val_acc5"):
            if key in metadata:
                info.metrics.setdefault(f"{key} of the saved weights", f"{float(metadata[key]):.2f}")
        if "weights" in metadata:
            info.provenance["saved weights"] = f"{metadata['weights']} (epoch {metadata.get('epoch', '?')})"
    info.img_size = _img_size(size)
    return info


# Files ----------------------------------------------------------------------------------------------------------


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):  # 1 MiB at a time: weights can be gigabytes
            digest.update(chunk)
    return digest.hexdigest()


def _is_local_path(value: str) -> bool:
    """Whether a setting's value names a place on this machine: an absolute or home path, or an existing file."""
    return os.path.isabs(value) or value.startswith("~") or (os.sep in value and Path(value).is_file())


def _without_location(value: str) -> str:
    """A local path as its last component, with the SHA-256 of the file it names if that file is here; any other
    value as it is."""
    if not _is_local_path(value):
        return value
    file = Path(value).expanduser()
    return f"{file.name} (SHA-256 {_sha256(file)})" if file.is_file() else file.name


def _run_files(path: Path) -> tuple[Path | None, Path | None, int | None]:
    """(run folder, config.yaml, checkpoint step or None) of a model file, run folder or checkpoint folder."""
    folder = path if path.is_dir() else path.parent
    if not (folder / RUN_CONFIG).is_file():
        return None, None, None
    state = folder / TRAINER_STATE
    if folder.parent.name == "checkpoints" and state.is_file():
        try:
            step = int(json.loads(state.read_text())["step"])
        except (ValueError, KeyError, TypeError, OSError):
            step = None
        return folder.parent.parent, folder / RUN_CONFIG, step
    return folder, folder / RUN_CONFIG, None


def _read_yaml(path: Path) -> dict[str, Any]:
    """A run's config.yaml (`load_yaml`, the one reader); {} if unreadable: the card then leaves its settings out."""
    try:
        return load_yaml(path)
    except ValueError:
        return {}


def _trains_fcmae(config: dict[str, Any]) -> bool:
    """Whether a run config records an FCMAE model (a pretraining run's), in either layout it was written in."""
    try:
        return FCMAEConfig.from_run_config(config) is not None
    except ValueError:  # a damaged config: described as a plain model file
        return False


def _records(run_dir: Path | None, name: str, step: int | None) -> list[dict[str, Any]]:
    """The JSON records of a run's log, up to `step` (a checkpoint's view of the run); garbled lines skipped."""
    if run_dir is None or not (run_dir / name).is_file():
        return []
    out = []
    for line in (run_dir / name).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (step is None or record.get("step", math.inf) <= step):
            out.append(record)
    return out


# Settings and metrics -------------------------------------------------------------------------------------------


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that describe how the weights were trained (run-control keys and empty values left out; local
    paths without their location)."""
    return {k: _without_location(v) if isinstance(v, str) else v for k, v in config.items()
            if k not in RUN_CONTROL_KEYS and v not in (None, "", []) and isinstance(v, (str, int, float, bool, list))}


def _pretrain_metrics(run_dir: Path | None, step: int | None) -> dict[str, str]:
    records = [r for r in _records(run_dir, METRICS, step) if "loss" in r]
    if not records:
        return {}
    first, last = records[0], records[-1]
    return {"pretraining loss": f"{first['loss']:.4f} at step {first.get('step')} -> {last['loss']:.4f} at step "
                                f"{last.get('step')} (epoch {_num(last.get('epoch'))})"}


def _finetune_metrics(run_dir: Path | None, metadata: dict[str, str], step: int | None) -> dict[str, str]:
    out = {}
    records = [r for r in _records(run_dir, METRICS, step) if "val_acc1" in r]
    if records:
        for prefix in ("val", "ema"):
            scored = [r for r in records if f"{prefix}_acc1" in r]
            if scored:
                best = max(scored, key=lambda r: r[f"{prefix}_acc1"])
                what = "EMA weights" if prefix == "ema" else "raw weights"
                out[f"best top-1 / top-5, {what}"] = (f"{best[f'{prefix}_acc1']:.2f} / "
                                                      f"{best.get(f'{prefix}_acc5', math.nan):.2f} "
                                                      f"(epoch {_num(best.get('epoch'))})")
        out["epochs recorded"] = str(len(records))
    return out


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def _img_size(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and size and all(isinstance(s, int) for s in size):
        return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])
    return 224, 224
