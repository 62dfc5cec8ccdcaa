"""The training configs: dataclasses that read top to bottom, and their mapping form (YAML, flags, JSON).

Each holds its model as one frozen config: `PretrainConfig.model` an `FCMAEConfig`, `FinetuneConfig.model` a
`ClassifierConfig` (the timm ConvNeXt V2 it fine-tunes), so `config.model.name` and `config.model.in_chans` read the
same in both scripts. Each field's comment is its documentation: `--help` and the flag tables of docs/configuration.md
are generated from it (`fcmae.fields.field_docs`).

The mapping form (`to_dict`, `from_dict`) nests the model: `{"model": {"name": ..., "mask_ratio": ...}, ...}`.
`from_dict` also takes the model's settings at the top level, as its command-line flags spell them
(`mask_ratio: 0.75`, `in_chans: 1`, and `model: atto` for the name), which is what config files written before
held; `flat_settings` turns a mapping back into that form.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, TypeVar

from ..errors import ConfigError
from ..fields import check_names, coerce
from .augmentation import check_augment_policy, check_interpolation
from .model import MODEL_SIZES, ClassifierConfig, FCMAEConfig

__all__ = ["TrainConfig", "PretrainConfig", "FinetuneConfig", "LINEAR_PROBE_RECIPE", "from_dict", "from_canonical",
           "merge", "nested_model", "flat_settings", "model_class", "MODEL_SET_BY_RUN"]

# Model fields a training config sets from its own (FCMAEConfig's img_size is input_size): not model-section keys.
MODEL_SET_BY_RUN = {"img_size": "input_size"}

# The most DataLoader workers a process starts by default: past it, more workers add memory, not throughput.
MAX_DEFAULT_WORKERS = 8


def default_num_workers() -> int:
    """num_workers -1: the CPU cores this process may run on, shared by the launcher's processes on this host
    (torchrun sets LOCAL_WORLD_SIZE; they all inherit one CPU set), at most MAX_DEFAULT_WORKERS and at least 1.
    More workers than cores make torch warn and only oversubscribe the cores."""
    try:
        cores = len(os.sched_getaffinity(0))  # a SLURM or taskset CPU set, not the machine's count
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    processes = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return max(1, min(MAX_DEFAULT_WORKERS, cores // processes))


# The largest learning rate a config may ask for. No optimizer here trains anywhere near it: AdamW recipes peak
# around 1e-3 and the largest lr of any recipe is the linear probe's SGD at blr 0.1 x 16384 / 256 = 6.4. Past it is
# a typo (--lr 1e39 for 1e-3), which would end in the optimizer with a float overflow and a long traceback.
MAX_LR = 100.0


@dataclass
class TrainConfig:
    """Settings shared by pretrain.py and finetune.py."""

    # Model and data
    model: Any = None  # the model's config (each subclass types it: FCMAEConfig, ClassifierConfig)
    data_path: str = ""  # a folder of images, searched recursively (its train/ if any); demo: scikit-image's photos
    output_dir: str = "output"  # where checkpoints, the model file, config.yaml and metrics go
    input_size: list[int] = field(default_factory=lambda: [224])  # H [W] of the crops, multiples of 32 (one: square)
    batch_size: int | Literal["auto"] = 64  # images per process and step; auto: the largest that fits the device
    accum_steps: int = 1  # gradient accumulation: effective batch = batch_size x processes x accum_steps
    effective_batch_size: int = 0  # > 0: choose accum_steps to reach this effective batch
    num_workers: int = -1  # DataLoader worker processes per process; -1: the cores it may use / processes per host, 1 to 8
    mean: list[float] = field(default_factory=list)  # per-channel mean of [0, 1] pixels; empty: ImageNet's (RGB)
    std: list[float] = field(default_factory=list)  # per-channel std, as many as mean (fcmae-stats DATA computes both)
    # Schedule: a per-step cosine with linear warmup
    epochs: int = 800  # passes over the data
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    warmup_epochs: float = 40.0  # linear warmup length in epochs
    warmup_steps: int = -1  # linear warmup length in steps; >= 0 overrides warmup_epochs
    # Optimizer: AdamW; lr = blr * effective batch / 256 unless lr is given
    blr: float = 1.5e-4  # base learning rate: lr = blr x effective batch / 256
    lr: float | None = None  # absolute learning rate; overrides blr
    min_lr: float = 0.0  # the cosine's floor
    weight_decay: float = 0.05  # AdamW weight decay (none on biases and norms)
    # Run control
    seed: int = 0  # seeds the weights, the masks, the data order and the augmentation
    resume: str = ""  # a checkpoint folder to continue from, or auto for the newest one in output_dir
    save_every: int = 1000  # steps between training-state checkpoints (and one at the end)
    keep_last: int = 3  # training-state checkpoints to keep
    log_every: int = 20  # steps between metrics records
    log_with: list[str] = field(default_factory=list)  # trackers: tensorboard, wandb
    progress: bool = True  # progress bars (--no-progress: none; also none when stdout is not a terminal)
    allow_resume_change: bool = False  # resume with another batch size/processes/accum/seed/data/input size: same epoch point
    timeout: float = 300.0  # seconds a step may wait on another process (hung, stopped) before the job ends; 0: never
    slow_timeout: float = 1800.0  # the same for a first step (compiling), evaluation, saves; setup: it + 60 s; 0: never
    # The keys given as command-line flags (set by parse_config; not a setting itself).
    explicit: typing.ClassVar[frozenset[str]] = frozenset()
    # Speed
    mixed_precision: str = ""  # no, bf16 or fp16 (CUDA, with a grad scaler); empty: accelerate launch's setting
    ddp_bucket_mb: float = 25.0  # DDP's gradient bucket size in MiB (larger: fewer all-reduces, later overlap)

    def __post_init__(self) -> None:
        """The canonical values, set once when the config is built; `validate` then only checks them.

        num_workers -1 becomes the number used (so config.yaml records it), and a "~" no shell expanded (from a
        YAML file, or written --data-path=~/photos) becomes the home folder.
        """
        if self.num_workers == -1:
            self.num_workers = default_num_workers()
        for name in ("data_path", "output_dir", "resume", "init_from", "finetune"):
            value = getattr(self, name, "")
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))

    @classmethod
    def recipe(cls, file: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
        """Values a switch brings with it (e.g. finetune's linear_probe): over the config file, under the flags."""
        return {}

    def check_data_channels(self, channels: int) -> None:
        """ConfigError unless the data's images have the channels the model takes (checked before training)."""
        if channels != self.model.in_chans:
            raise ConfigError(f"the images of {self.data_path} load with {channels} channel(s) but the model takes "
                              f"{self.model.in_chans} (--in-chans {self.model.in_chans}); set --in-chans {channels}")

    def normalization(self) -> tuple[list[float], list[float]] | tuple[None, None]:
        """(mean, std) per channel from the config, or (None, None) for ImageNet's (RGB only)."""
        return (list(self.mean), list(self.std)) if self.mean else (None, None)

    def check_normalization(self) -> None:
        """ConfigError unless mean / std fit the model's channels (called once the model is known)."""
        channels = self.model.in_chans
        if self.mean and len(self.mean) != channels:
            raise ConfigError(f"mean and std have {len(self.mean)} value(s) but the model takes {channels} "
                              f"channel(s): give one per channel")
        if not self.mean and channels != 3:
            raise ConfigError(f"in_chans {channels} needs --mean and --std, one value per channel (ImageNet's are "
                              f"for RGB); fcmae-stats DATA --in-chans {channels} computes them")

    def to_dict(self) -> dict[str, Any]:
        """The config as YAML / JSON values, the model as a nested mapping (what config.yaml holds)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "model":
                value = nested_model(type(self), value, "")
            values[f.name] = list(value) if isinstance(value, tuple) else value
        return values

    @property
    def auto_batch(self) -> bool:
        """batch_size is "auto": the scripts find it (fcmae.training.batch_size) before building the loader."""
        return self.batch_size == "auto"

    @property
    def input_size_is_valid(self) -> bool:
        """input_size is one or two positive multiples of 32 (`img_size` is then defined)."""
        return len(self.input_size) in (1, 2) and all(s > 0 and s % 32 == 0 for s in self.input_size)

    @property
    def img_size(self) -> tuple[int, int]:
        """(H, W) from input_size: the image size of the run, and its model's img_size (one internal name, as in
        FCMAEConfig; input_size stays the key and flag)."""
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

    def base_lr(self, effective_batch: int) -> float:
        """lr, or blr x effective_batch / 256; ConfigError if that is above MAX_LR (a large blr times a large
        batch), before any optimizer overflows on it."""
        if self.lr:
            return self.lr
        lr = self.blr * effective_batch / 256
        if not lr <= MAX_LR:
            raise ConfigError(f"blr {self.blr:g} x effective batch {effective_batch} / 256 gives lr {lr:g}, above "
                              f"{MAX_LR:g}: no optimizer here trains that fast; give a smaller --blr (or an --lr)")
        return lr

    def validate(self) -> None:
        """Raise ConfigError for values no run can use. Only checks: the values were made canonical when the
        config was built (`__post_init__`)."""
        for name, value in vars(self).items():  # coerce stops nan / inf from files and flags; this, from code
            numbers = value if isinstance(value, list) else [value]
            if any(isinstance(number, float) and not math.isfinite(number) for number in numbers):
                raise ConfigError(f"{name} must be a finite number, got {value}")
        if not self.input_size_is_valid:
            raise ConfigError(f"input_size must be one or two positive multiples of 32, got {self.input_size}")
        for name in ("batch_size", "accum_steps", "epochs", "save_every", "keep_last", "log_every"):
            if not (name == "batch_size" and self.auto_batch) and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "max_steps", "warmup_epochs", "min_lr", "weight_decay", "effective_batch_size",
                     "timeout", "slow_timeout", "ddp_bucket_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("blr", "lr"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("blr", "lr", "min_lr"):
            value = getattr(self, name)
            if value is not None and value > MAX_LR:
                raise ConfigError(f"{name} must be <= {MAX_LR:g}, got {value:g}: no optimizer here trains that fast "
                                  f"(the recipes' largest lr is 6.4); give a smaller --{name.replace('_', '-')}")
        # The smallest effective batch this config can run with (1 process; effective_batch_size may stop
        # accumulation early on a small dataset): blr times it is already too large. Run.base_lr checks the real one.
        self.base_lr((1 if self.auto_batch else self.batch_size) * (1 if self.effective_batch_size else self.accum_steps))
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        if not self.output_dir.strip():
            raise ConfigError("output_dir is empty: pass --output-dir FOLDER")
        if self.mixed_precision not in ("", "no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if len(self.mean) != len(self.std):
            raise ConfigError(f"mean has {len(self.mean)} value(s) and std {len(self.std)}: give both, one per channel")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be > 0 for every channel, got {self.std}")
        unknown = sorted(set(self.log_with) - {"tensorboard", "wandb"})
        if unknown:
            raise ConfigError(f"unknown tracker(s) {', '.join(unknown)} in log_with; choose tensorboard or wandb")


@dataclass
class PretrainConfig(TrainConfig):
    """FCMAE pretraining (pretrain.py). Defaults are the paper's recipe."""

    model: FCMAEConfig = field(default_factory=FCMAEConfig)  # the model; its img_size is input_size
    init_from: str = ""  # start from a model file's weights (not its training state)
    vis_every: int = 0  # steps between reconstruction grids in output_dir/vis (0: only at the end)
    compile: bool = False  # torch.compile the forward and loss whole (fullgraph); ragged masks run eager
    compile_mode: str = ""  # torch.compile mode (implies compile): default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs
    compile_cache: str = ""  # folder for compiled kernels, shared by the processes and by later runs; empty: inductor's own
    gpu_augment: bool = False  # decode JPEGs (nvjpeg) and crop, flip, normalize on the device; workers only read files
    monitor_data: str = ""  # labeled images (train/, val/, a folder per class): log the features' kNN top-1 (knn_top1)
    monitor_every: int = 1000  # steps between kNN evaluations on monitor_data (and one at the last step)

    def __post_init__(self) -> None:
        """Also builds `model` (from its settings, if given as a mapping or a name), with img_size = input_size;
        a malformed input_size leaves it for `validate` to name. compile_mode implies compile."""
        super().__post_init__()
        if self.input_size_is_valid:
            if not isinstance(self.model, FCMAEConfig):
                self.model = FCMAEConfig.from_dict({**nested_model(type(self), self.model, "the model settings"),
                                                    "img_size": self.img_size}, source="the model settings")
            elif self.model.img_size != self.img_size:
                self.model = self.model.replace(img_size=self.img_size)
        if self.compile_mode:
            self.compile = True

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.model, FCMAEConfig):
            raise ConfigError(f"model must be an FCMAEConfig (or its settings when the config is built), got "
                              f"{type(self.model).__name__}")
        if self.model.img_size != self.img_size:
            raise ConfigError(f"the model's img_size {list(self.model.img_size)} is not input_size "
                              f"{self.input_size}: a training config sets it with input_size")
        if self.model.backend.startswith("minkowski"):
            from ..minkowski import require  # fails here, before anything is written, without MinkowskiEngine

            require()
        if self.vis_every < 0:
            raise ConfigError(f"vis_every must be >= 0, got {self.vis_every}")
        if self.monitor_every < 1:
            raise ConfigError(f"monitor_every must be >= 1, got {self.monitor_every}")
        self.check_normalization()
        if self.compile_mode and self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.gpu_augment and self.model.in_chans != 3:
            raise ConfigError(f"gpu_augment decodes RGB photos; with in_chans {self.model.in_chans} leave it off")


# torch.compile's modes (torch._inductor.list_mode_options); "reduce-overhead" and "max-autotune" replay CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# The MAE linear-probe protocol (He et al. 2022, main_linprobe.py): blr 0.1 for an effective batch of 16384, 90
# epochs with 10 of warmup, no weight decay, RandomResizedCrop + flip and nothing else. SGD (momentum 0.9) rather
# than MAE's LARS: LARS moves each weight by lr x 0.001 of its norm per step, which on a dataset smaller than one
# effective batch (one step per epoch, 90 in all) leaves the head at its init; --optimizer lars restores it.
# On data too small for MAE's batch (fewer than 20 x 16384 images; ImageNet-1k makes 78 steps of it an epoch) the
# effective batch shrinks until an epoch makes 20 steps, and the lr with it (blr x batch / 256): one step an epoch
# leaves the head far from what the features support (docs/finetuning.md, Linear probe).
LINEAR_PROBE_RECIPE: dict[str, Any] = dict(
    optimizer="sgd", blr=0.1, lr=None, effective_batch_size=16384, min_steps_per_epoch=20, epochs=90,
    warmup_epochs=10.0, warmup_steps=-1,
    min_lr=0.0, weight_decay=0.0, layer_decay=1.0, drop_path=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, reprob=0.0,
    aa="", color_jitter=0.0, model_ema=False,
)  # fmt: skip


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tuning and linear probing (finetune.py). Defaults are the paper's ConvNeXt V2-Base recipe."""

    model: ClassifierConfig = field(default_factory=ClassifierConfig)  # the classifier
    data_path: str = ""  # holds train/ and val/, one subfolder per class; digits:FOLDER writes the digits there
    finetune: str = ""  # weights to start from: any checkpoint fcmae.convert reads (converted on the fly)
    batch_size: int | Literal["auto"] = 32
    epochs: int = 100
    warmup_epochs: float = 20.0
    blr: float = 6.25e-4
    min_lr: float = 1e-6
    optimizer: str = "adamw"  # "adamw", "lars" (the linear-probe protocol) or "sgd" (momentum 0.9)
    layer_decay: float = 0.6  # lr of layer i = lr * layer_decay ** (last id + 1 - i); 1.0 turns it off
    layer_decay_type: str = "group"  # "single" (an id per block) or "group" (12 ids, for 3-3-27-3 models)
    smoothing: float = 0.1  # label smoothing (folded into the mixup targets when mixup/cutmix is on)
    mixup: float = 0.8  # mixup alpha; 0 turns it off
    cutmix: float = 1.0  # cutmix alpha; 0 turns it off
    reprob: float = 0.25  # random erasing probability
    aa: str = "rand-m9-mstd0.5-inc1"  # RandAugment policy ("" for none)
    color_jitter: float = 0.4  # timm's color jitter, used only when aa is off
    model_ema: bool = True  # keep an exponential moving average of the weights
    model_ema_decay: float = 0.9999  # its decay per step
    model_ema_eval: bool = True  # also evaluate the EMA model (and let it compete for the best weights)
    crop_pct: float = 0.875  # evaluation: resize to input / crop_pct, then center crop
    interpolation: str = "bicubic"  # resize interpolation, training and evaluation
    eval: bool = False  # only evaluate the weights given by --resume (a model file or a checkpoint folder)
    linear_probe: bool = False  # the MAE linear-probe protocol (LINEAR_PROBE_RECIPE): frozen encoder, BN + linear
    min_steps_per_epoch: int = 0  # > 0: accumulate less where an epoch would make fewer steps (--linear-probe: 20)
    save_every: int = 5000

    @classmethod
    def recipe(cls, file: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
        """With linear_probe, LINEAR_PROBE_RECIPE in place of the defaults and of a fine-tuning --config file's
        values; flags given on the command line, and a config file that itself sets linear_probe, win over it."""
        if not flags.get("linear_probe", file.get("linear_probe", False)):
            return {}
        explicit = set(flat_settings(flags)) | (set(flat_settings(file)) if file.get("linear_probe") else set())
        return canonical(cls, {k: v for k, v in LINEAR_PROBE_RECIPE.items() if k not in explicit},
                         "the linear-probe recipe")

    def effective_accum_steps(self, processes: int, batches_per_epoch: int) -> tuple[int, str]:
        """TrainConfig's, then with min_steps_per_epoch: fewer accumulated batches where an epoch of
        batches_per_epoch would make fewer optimizer steps than that (the lr follows the batch used)."""
        accum, note = super().effective_accum_steps(processes, batches_per_epoch)
        steps = -(-batches_per_epoch // accum)  # Accelerate also steps on an epoch's last, partial accumulation
        if not (self.effective_batch_size and self.min_steps_per_epoch) or steps >= self.min_steps_per_epoch:
            return accum, note
        per_step = self.batch_size * processes
        accum = max(batches_per_epoch // self.min_steps_per_epoch, 1)
        few = "" if batches_per_epoch >= self.min_steps_per_epoch else (
            f"; the data holds only {batches_per_epoch}, lower --batch-size for more")
        return accum, (f"accum_steps {accum}: effective batch {per_step * accum} = {self.batch_size} x {processes} "
                       f"process(es) x {accum} instead of {self.effective_batch_size}, so that an epoch of "
                       f"{batches_per_epoch} batch(es) makes {-(-batches_per_epoch // accum)} optimizer steps, not "
                       f"{steps} (min_steps_per_epoch {self.min_steps_per_epoch}{few}); the lr follows the batch")

    def __post_init__(self) -> None:
        """Also builds `model` (from its settings, if given as a mapping or a name: "atto" -> "convnextv2_atto")."""
        super().__post_init__()
        if not isinstance(self.model, ClassifierConfig):
            self.model = ClassifierConfig.from_dict(nested_model(type(self), self.model, "the model settings"),
                                                    source="the model settings")

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.model, ClassifierConfig):
            raise ConfigError(f"model must be a ClassifierConfig (or its settings when the config is built), got "
                              f"{type(self.model).__name__}")
        self.check_normalization()
        if self.min_steps_per_epoch < 0:
            raise ConfigError(f"min_steps_per_epoch must be >= 0, got {self.min_steps_per_epoch}")
        if self.layer_decay_type not in ("single", "group"):
            raise ConfigError(f"layer_decay_type must be single or group, got {self.layer_decay_type!r}")
        if self.optimizer not in ("adamw", "lars", "sgd"):
            raise ConfigError(f"optimizer must be adamw, lars or sgd, got {self.optimizer!r}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        for name in ("smoothing", "reprob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.mixup < 0 or self.cutmix < 0 or self.color_jitter < 0:
            raise ConfigError("mixup, cutmix and color_jitter must be >= 0")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        check_interpolation(self.interpolation)
        check_augment_policy(self.aa)
        if not 0.0 < self.model_ema_decay < 1.0:
            raise ConfigError(f"model_ema_decay must be in (0, 1), got {self.model_ema_decay}")
        if self.eval and not self.resume:
            raise ConfigError("--eval needs --resume FILE: the model file or checkpoint folder to evaluate")


Config = TypeVar("Config", bound=TrainConfig)


# The mapping form -----------------------------------------------------------------------------------------------


def from_dict(cls: type[Config], values: Mapping[str, Any], source: str = "the config") -> Config:
    """A validated `cls` config from a mapping (a YAML file, flags, a saved config.yaml), values coerced to the
    field types. Unknown keys fail with a "did you mean" naming `source`."""
    return from_canonical(cls, canonical(cls, values, source))


def from_canonical(cls: type[Config], values: Mapping[str, Any]) -> Config:
    """`from_dict` for a mapping already in canonical form (`canonical`'s output, or a `merge` of such): its keys
    were checked once, where they were read, and are not read again."""
    hints = _hints(cls)
    kwargs = {key: value if key == "model" else coerce(key, value, hints[key]) for key, value in values.items()}
    config = cls(**kwargs)
    config.validate()
    return config


def canonical(cls: type[TrainConfig], values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`values` with underscores in every key, checked against `cls`, the model's settings gathered into one
    nested mapping under "model" (see the module docstring)."""
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    model = nested_model(cls, values.pop("model", {}), f"{source}'s model section")
    for key in [k for k in values if k in model_keys(cls)]:
        if key in model and model[key] != values[key]:
            raise ConfigError(f"{key} is set twice in {source}, at the top level and in the model section")
        model[key] = values.pop(key)
    check_names(values, top_level_keys(cls), "key", source)
    return {**values, "model": model} if model else values


def nested_model(cls: type[TrainConfig], model: Any, source: str) -> dict[str, Any]:
    """`cls`'s model given as a name, a mapping of its fields or its config -> its mapping, checked (FCMAEConfig's
    img_size left out: input_size sets it)."""
    if isinstance(model, model_class(cls)):  # a named size's depths and dims go without saying
        named = MODEL_SIZES.get(model.name) == (getattr(model, "depths", ()), getattr(model, "dims", ()))
        return {k: v for k, v in model.to_dict().items()
                if k not in MODEL_SET_BY_RUN and not (named and k in ("depths", "dims"))}
    if isinstance(model, str):
        return {"name": model}
    if not isinstance(model, Mapping):
        raise ConfigError(f"model in {source} must be a model name or a mapping of model settings, got {model!r}")
    model = {str(k).replace("-", "_"): v for k, v in model.items()}
    for key, run_key in MODEL_SET_BY_RUN.items():
        if key in model:
            raise ConfigError(f"{key} in {source}: a training config sets it with {run_key}")
    check_names(model, model_keys(cls), "key", source)
    return model


def flat_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping with its model section's settings at the top level, as the command-line flags spell them
    (`model` the model's name): the form of a config file written before models nested, and of a classifier
    file's metadata (`in_chans`)."""
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    model = values.get("model")
    if not isinstance(model, Mapping):
        return values
    model = {str(k).replace("-", "_"): v for k, v in model.items()}
    return {**values, **{k: v for k, v in model.items() if k != "name"}, "model": model.get("name")}


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical mappings, later ones winning; their model sections merge key by key (a --model flag changes the
    name and keeps the file's other model settings)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            out[key] = {**out[key], **value} if key == "model" and isinstance(out.get(key), dict) else value
    return out


def model_class(cls: type[TrainConfig]) -> type[FCMAEConfig] | type[ClassifierConfig]:
    """The config class of `cls`'s model: FCMAEConfig for pretraining, ClassifierConfig for fine-tuning."""
    model = _hints(cls)["model"]
    if model not in (FCMAEConfig, ClassifierConfig):
        raise TypeError(f"{cls.__name__}.model must be typed FCMAEConfig or ClassifierConfig, not {model}")
    return model


def model_keys(cls: type[TrainConfig]) -> list[str]:
    """The model fields a `cls` config's model section takes."""
    return [f.name for f in dataclasses.fields(model_class(cls)) if f.name not in MODEL_SET_BY_RUN]


def top_level_keys(cls: type[TrainConfig]) -> list[str]:
    """Keys valid at the top level of a `cls` mapping: its fields, and its model's settings but the name."""
    return [f.name for f in dataclasses.fields(cls)] + [k for k in model_keys(cls) if k != "name"]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)
