"""Training configs: dataclasses read top to bottom, YAML files, and command-line flags that override them.

Precedence: dataclass defaults < `--config FILE` < command-line flags. Every field is a flag spelled with dashes
(`--mask-ratio`) and a YAML key spelled with underscores (`mask_ratio`). An unknown key or flag fails and lists
the valid ones. The resolved config is written next to the run's outputs and into every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from .errors import ConfigError
from .model_config import FCMAEConfig, resolve_name

__all__ = [
    "ConfigError", "TrainConfig", "PretrainConfig", "FinetuneConfig", "parse_config", "load_yaml", "save_yaml",
    "OneLineArgumentParser", "LINEAR_PROBE_RECIPE",
]


@dataclass
class TrainConfig:
    """Settings shared by pretrain.py and finetune.py."""

    # Model and data
    model: str = "convnextv2_atto"
    data_path: str = ""  # a folder of images, searched recursively ("<path>/train" if it exists)
    output_dir: str = "output"
    input_size: list[int] = field(default_factory=lambda: [224])  # one int (square) or H W; multiples of 32
    batch_size: int = 64  # per process
    accum_steps: int = 1  # gradient accumulation: effective batch = batch_size * processes * accum_steps
    effective_batch_size: int = 0  # > 0: choose accum_steps to reach it (see effective_accum_steps)
    num_workers: int = 8
    # Schedule: a per-step cosine with linear warmup
    epochs: int = 800
    max_steps: int = 0  # > 0 overrides epochs
    warmup_epochs: float = 40.0
    warmup_steps: int = -1  # >= 0 overrides warmup_epochs
    # Optimizer: AdamW; lr = blr * effective batch / 256 unless lr is given
    blr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    # Run control
    seed: int = 0
    resume: str = ""  # a checkpoint folder, or "auto" for the newest one in output_dir
    save_every: int = 1000  # steps between training-state checkpoints (and one at the end)
    keep_last: int = 3  # checkpoints to keep
    log_every: int = 20  # steps between metrics records
    log_with: list[str] = field(default_factory=list)  # trackers: tensorboard, wandb
    progress: bool = True  # progress bars (--no-progress: none; also none when stdout is not a terminal)
    allow_resume_change: bool = False  # resume with another batch size/processes/accum/seed/data: same epoch point
    # The keys given as command-line flags (set by parse_config; not a setting itself).
    explicit: typing.ClassVar[frozenset[str]] = frozenset()
    # Speed
    mixed_precision: str = ""  # "no", "bf16" or "fp16" (CUDA, with a grad scaler); "": accelerate launch's setting

    @classmethod
    def recipe(cls, file: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
        """Values a switch brings with it (e.g. finetune's linear_probe): over the config file, under the flags."""
        return {}

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) from input_size."""
        size = self.input_size
        return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])

    def effective_accum_steps(self, processes: int, batches_per_epoch: int) -> tuple[int, str]:
        """accum_steps that reach effective_batch_size with `processes`, and a sentence saying what was chosen.

        The recipe's effective batch must be a multiple of batch_size x processes. On a dataset smaller than one
        effective batch, accumulation stops at one epoch's batches (lr follows the batch actually used).
        """
        if not self.effective_batch_size:
            return self.accum_steps, ""
        per_step = self.batch_size * processes
        if self.effective_batch_size % per_step:
            raise ConfigError(
                f"effective_batch_size {self.effective_batch_size} is not a multiple of batch_size {self.batch_size} "
                f"x {processes} process(es) = {per_step}; change --batch-size or --effective-batch-size"
            )
        accum = self.effective_batch_size // per_step
        note = (f"accum_steps {accum} to reach effective batch {self.effective_batch_size} = {self.batch_size} x "
                f"{processes} process(es) x {accum}")
        if accum > batches_per_epoch:
            accum = max(batches_per_epoch, 1)
            note = (f"accum_steps {accum}: the dataset holds only {batches_per_epoch} batch(es) of {per_step} per "
                    f"epoch, less than effective batch {self.effective_batch_size}; using {per_step * accum}")
        return accum, note

    def validate(self) -> None:
        """Raise ConfigError for values no run can use."""
        try:
            self.model = resolve_name(self.model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if len(self.input_size) not in (1, 2) or any(s <= 0 or s % 32 for s in self.input_size):
            raise ConfigError(f"input_size must be one or two positive multiples of 32, got {self.input_size}")
        for name in ("batch_size", "accum_steps", "epochs", "save_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "max_steps", "warmup_epochs", "min_lr", "weight_decay", "effective_batch_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("blr", "lr"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        if not self.output_dir.strip():
            raise ConfigError("output_dir is empty: pass --output-dir FOLDER")
        for name in ("data_path", "output_dir", "resume", "init_from", "finetune"):  # a "~" no shell expanded:
            value = getattr(self, name, "")  # from a YAML file, or written --data-path=~/photos
            if value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))
        if self.mixed_precision not in ("", "no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        unknown = sorted(set(self.log_with) - {"tensorboard", "wandb"})
        if unknown:
            raise ConfigError(f"unknown tracker(s) {', '.join(unknown)} in log_with; choose tensorboard or wandb")


@dataclass
class PretrainConfig(TrainConfig):
    """FCMAE pretraining (pretrain.py). Defaults are the paper's recipe."""

    mask_ratio: float = 0.6  # fraction of 32x32 patches removed
    decoder_depth: int = 1
    decoder_embed_dim: int = 512
    norm_pix_loss: bool = True
    backend: str = "sparse"  # encoder backend: "sparse", the masked-dense reference "dense", or "minkowski"
    init: str = "timm"  # weight init: "timm" (std 0.02) or "official" (the official FCMAE re-init, std 1)
    init_from: str = ""  # start from a model file's weights (not its training state)
    vis_every: int = 0  # steps between reconstruction grids in output_dir/vis (0: only at the end)
    compile: bool = False  # torch.compile the forward and loss whole (fullgraph); ragged masks run eager

    def model_config(self) -> FCMAEConfig:
        """The FCMAE model this config asks for (validated there, once)."""
        return FCMAEConfig(name=self.model, img_size=self.image_size, mask_ratio=self.mask_ratio,
                           decoder_depth=self.decoder_depth, decoder_embed_dim=self.decoder_embed_dim,
                           norm_pix_loss=self.norm_pix_loss, backend=self.backend, init=self.init)

    def validate(self) -> None:
        super().validate()
        self.model_config()
        if self.backend.startswith("minkowski"):
            from .minkowski import require  # fails here, before anything is written, without MinkowskiEngine

            require()
        if self.vis_every < 0:
            raise ConfigError(f"vis_every must be >= 0, got {self.vis_every}")


# The MAE linear-probe protocol (He et al. 2022, main_linprobe.py): blr 0.1 for an effective batch of 16384, 90
# epochs with 10 of warmup, no weight decay, RandomResizedCrop + flip and nothing else. SGD (momentum 0.9) rather
# than MAE's LARS: LARS moves each weight by lr x 0.001 of its norm per step, which on a dataset smaller than one
# effective batch (one step per epoch, 90 in all) leaves the head at its init; --optimizer lars restores it.
LINEAR_PROBE_RECIPE: dict[str, Any] = dict(
    optimizer="sgd", blr=0.1, lr=None, effective_batch_size=16384, epochs=90, warmup_epochs=10.0, warmup_steps=-1,
    min_lr=0.0, weight_decay=0.0, layer_decay=1.0, drop_path=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, reprob=0.0,
    aa="", color_jitter=0.0, model_ema=False,
)  # fmt: skip


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tuning and linear probing (finetune.py). Defaults are the paper's ConvNeXt V2-Base recipe."""

    data_path: str = ""  # holds train/ and val/, one subfolder per class (the ImageNet layout)
    finetune: str = ""  # weights to start from: any checkpoint fcmae.convert reads (converted on the fly)
    num_classes: int = 0  # 0: the number of class folders in train/
    batch_size: int = 32
    epochs: int = 100
    warmup_epochs: float = 20.0
    blr: float = 6.25e-4
    min_lr: float = 1e-6
    optimizer: str = "adamw"  # "adamw", "lars" (the linear-probe protocol) or "sgd" (momentum 0.9)
    layer_decay: float = 0.6  # lr of layer i = lr * layer_decay ** (last id + 1 - i); 1.0 turns it off
    layer_decay_type: str = "group"  # "single" (an id per block) or "group" (12 ids, for 3-3-27-3 models)
    head_init_scale: float = 0.001  # the new classifier's init is scaled by this (official: 0.001, i.e. std 2e-5)
    drop_path: float = 0.1
    smoothing: float = 0.1  # label smoothing (folded into the mixup targets when mixup/cutmix is on)
    mixup: float = 0.8  # mixup alpha; 0 turns it off
    cutmix: float = 1.0  # cutmix alpha; 0 turns it off
    reprob: float = 0.25  # random erasing probability
    aa: str = "rand-m9-mstd0.5-inc1"  # RandAugment policy ("" for none)
    color_jitter: float = 0.4  # timm's color jitter, used only when aa is off
    model_ema: bool = True
    model_ema_decay: float = 0.9999
    model_ema_eval: bool = True  # also evaluate the EMA model (and let it compete for the best weights)
    crop_pct: float = 0.875  # evaluation: resize to input / crop_pct, then center crop
    interpolation: str = "bicubic"  # resize interpolation, training and evaluation
    eval: bool = False  # only evaluate the weights given by --resume (a model file or a checkpoint folder)
    linear_probe: bool = False  # the MAE linear-probe protocol (LINEAR_PROBE_RECIPE): frozen encoder, BN + linear
    save_every: int = 5000

    @classmethod
    def recipe(cls, file: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
        """With linear_probe, LINEAR_PROBE_RECIPE in place of the defaults and of a fine-tuning --config file's
        values; flags given on the command line, and a config file that itself sets linear_probe, win over it."""
        if not flags.get("linear_probe", file.get("linear_probe", False)):
            return {}
        explicit = set(flags) | (set(file) if file.get("linear_probe") else set())
        return {k: v for k, v in LINEAR_PROBE_RECIPE.items() if k not in explicit}

    def validate(self) -> None:
        super().validate()
        if self.num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0 (0: count the class folders), got {self.num_classes}")
        if self.layer_decay_type not in ("single", "group"):
            raise ConfigError(f"layer_decay_type must be single or group, got {self.layer_decay_type!r}")
        if self.optimizer not in ("adamw", "lars", "sgd"):
            raise ConfigError(f"optimizer must be adamw, lars or sgd, got {self.optimizer!r}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        for name in ("drop_path", "smoothing", "reprob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.mixup < 0 or self.cutmix < 0 or self.color_jitter < 0:
            raise ConfigError("mixup, cutmix and color_jitter must be >= 0")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ConfigError(f"interpolation must be bicubic, bilinear or nearest, got {self.interpolation!r}")
        if self.head_init_scale <= 0:
            raise ConfigError(f"head_init_scale must be > 0, got {self.head_init_scale}")
        if not 0.0 < self.model_ema_decay < 1.0:
            raise ConfigError(f"model_ema_decay must be in (0, 1), got {self.model_ema_decay}")
        if self.eval and not self.resume:
            raise ConfigError("--eval needs --resume FILE: the model file or checkpoint folder to evaluate")


Config = TypeVar("Config", bound=TrainConfig)


# Files ----------------------------------------------------------------------------------------------------------


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`; ConfigError if it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def save_yaml(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


# Command line ---------------------------------------------------------------------------------------------------


def parse_config(
    cls: type[Config], argv: Sequence[str] | None = None, description: str = "", demo: str | Path | None = None
) -> Config:
    """Build a `cls` config from defaults, an optional `--config FILE`, then command-line flags.

    With `demo`, a command line that names neither --config nor --data-path runs that config file (with any
    other flags as overrides): a script with no arguments runs its demo.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if demo is not None and not any(a.split("=")[0] in ("--config", "--data-path") for a in argv):
        argv = ["--config", str(demo), *argv]
    parser = _parser(cls, description)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(f"unknown argument(s) {' '.join(unknown)}; valid flags: {', '.join(_flags(cls))}")
    file = _check_keys(cls, load_yaml(args.config), source=args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    config = from_dict(cls, {**file, **cls.recipe(file, flags), **flags})
    config.explicit = frozenset(flags)
    config.validate()
    return config


def from_dict(cls: type[Config], values: dict[str, Any]) -> Config:
    """A `cls` config from a mapping of (already checked) keys, with values coerced to the field types."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in _check_keys(cls, values, source="config").items():
        kwargs[key] = _coerce(key, value, hints[key])
    return cls(**kwargs)


def _check_keys(cls: type[TrainConfig], values: dict[str, Any], source: str) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {source}; valid keys: {', '.join(names)}")
    return values


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check a YAML or flag value against a field type; ints, single values for lists, and None are lifted."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin is list:
            items = value if isinstance(value, (list, tuple)) else [value]
            return [_coerce(key, item, args[0]) for item in items]
        if type(None) in args:  # Optional[X]
            return None if value is None else _coerce(key, value, next(a for a in args if a is not type(None)))
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ValueError
            return float(value)
        if hint is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if hint is int and isinstance(value, str):
            return int(value)
        if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r}") from None


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return _type_name(args[0]) + " or null"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(hint, str(hint))


def _flags(cls: type[TrainConfig]) -> list[str]:
    return ["--config"] + ["--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)]


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise ConfigError (printed as one `error:` line), not usage + error."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def _parser(cls: type[TrainConfig], description: str) -> argparse.ArgumentParser:
    """One flag per field. Defaults are None so that only flags actually given override the file."""
    parser = OneLineArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of settings; flags override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f"(default: {default})"
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(hint) is list:
            item = typing.get_args(hint)[0]
            parser.add_argument(flag, nargs="*" if f.name == "log_with" else "+", type=item, default=None,
                                help=help_text, metavar=f.name.upper())
        else:
            value_type = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
            parser.add_argument(flag, type=value_type, default=None, help=help_text, metavar=f.name.upper())
    return parser
