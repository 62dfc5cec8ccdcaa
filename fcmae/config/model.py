"""The models' configs: FCMAEConfig (an FCMAE model), ClassifierConfig (finetune.py's timm classifier), and the
ConvNeXt V2 sizes they name.

Each is built once, validated once (in `__post_init__`, a one-line ConfigError per problem) and frozen afterwards.
The model (`FCMAE(config)`), `create_model`, the training configs (`PretrainConfig.model`), every model file's
metadata (`to_metadata` / `from_metadata`) and the loaders all use the one FCMAEConfig:

    config = FCMAEConfig("atto", img_size=96, mask_ratio=0.75)
    model = FCMAE(config)                       # or fcmae.create_model("atto", img_size=96, mask_ratio=0.75)
    model.config.mask_ratio                     # 0.75
    FCMAEConfig.from_metadata(safetensors_metadata) == config

`FinetuneConfig.model` is a ClassifierConfig the same way: `config.model.name`, `config.model.in_chans` read the
same in both scripts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ConfigError
from ..fields import check_names, coerce
from ..patch_grid import grid_size, kept_per_sample

__all__ = ["FCMAEConfig", "ClassifierConfig", "MODEL_SIZES", "MODEL_FORMAT", "BACKENDS", "INIT_SCHEMES",
           "STEM_STRIDE", "CUSTOM", "list_models", "resolve_name"]

# name: (depths, dims), from the ConvNeXt V2 paper; the names are timm's.
MODEL_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "convnextv2_atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "convnextv2_femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "convnextv2_pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "convnextv2_nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "convnextv2_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnextv2_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnextv2_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnextv2_huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}
CUSTOM = "custom"  # the name of a size given by its depths and dims (and of an encoder that matches no named size)
MODEL_FORMAT = "fcmae"  # the "format" entry of a model file's metadata
STEM_STRIDE = 4  # the stem's patchify stride; each later stage halves the resolution once more
BACKENDS = ("sparse", "dense", "minkowski", "minkowski-official")  # fcmae.encoder's, fcmae.minkowski's last two
INIT_SCHEMES = ("timm", "official")  # fcmae.initialization's


def list_models() -> list[str]:
    """The model names `create_model` accepts (short forms such as "atto" work too)."""
    return list(MODEL_SIZES)


def resolve_name(name: str) -> str:
    """'atto' or 'convnextv2_atto' -> 'convnextv2_atto'; ConfigError for an unknown name."""
    if not isinstance(name, str):
        raise ConfigError(f"model name must be a string such as 'convnextv2_atto', got {name!r}")
    full = name if name.startswith("convnextv2_") else f"convnextv2_{name}"
    if full not in MODEL_SIZES:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODEL_SIZES)} (or custom with depths "
                          "and dims)")
    return full


def total_stride(depths: tuple[int, ...] | list[int]) -> int:
    """The encoder's total stride: the stem's, halved once more by each later stage (32 for 4 stages)."""
    return STEM_STRIDE * 2 ** (len(depths) - 1)


def check_stages(depths: tuple[int, ...] | list[int], dims: tuple[int, ...] | list[int], patch_size: int) -> None:
    """ConfigError unless depths and dims are positive and of equal length, and patch_size is their total stride.

    FCMAEConfig's check, also the encoder's when a caller builds it without one (`SparseConvNeXtV2(depths, dims)`).
    """
    if not depths or len(depths) != len(dims) or min(depths) < 1 or min(dims) < 1:
        raise ConfigError(f"depths {list(depths)} and dims {list(dims)} must be positive and of equal length")
    stride = total_stride(depths)
    if patch_size != stride:
        raise ConfigError(f"patch_size must equal the encoder's total stride {stride} ({len(depths)} stages), "
                          f"got {patch_size}")


def check_backend(backend: str) -> None:
    """ConfigError unless `backend` is one of BACKENDS (FCMAEConfig's check, also the encoder's setter's)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class FCMAEConfig:
    """An FCMAE model: encoder size, input, masking, decoder, loss, backend and init."""

    name: str = "convnextv2_atto"  # a ConvNeXt V2 size (atto ... huge), or custom (then give depths and dims)
    depths: tuple[int, ...] = ()  # encoder blocks per stage; empty: the named size's
    dims: tuple[int, ...] = ()  # encoder channels per stage; empty: the named size's
    img_size: tuple[int, int] = (224, 224)  # nominal input H W (one int: square), multiples of patch_size
    patch_size: int = 32  # side of a mask patch in pixels: the encoder's total stride
    in_chans: int = 3  # input channels: 3 for RGB, 1 for grayscale, 4 for RGB + near infrared, ...
    mask_ratio: float = 0.6  # fraction of the patches removed from each image
    decoder_depth: int = 1  # ConvNeXt V2 blocks in the decoder
    decoder_embed_dim: int = 512  # decoder width
    norm_pix_loss: bool = True  # normalize each target patch by its own mean and variance
    drop_path_rate: float = 0.0  # encoder stochastic depth at the last block (rising linearly from 0)
    backend: str = "sparse"  # encoder backend: sparse, dense (masked-dense reference), minkowski, minkowski-official
    init: str = "timm"  # weight init: timm (std 0.02) or official (the official FCMAE re-init, std 1)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # types first: a YAML string or a list becomes what the field holds
            object.__setattr__(self, f.name, coerce(f.name, getattr(self, f.name), _hints()[f.name]))
        if self.name == CUSTOM:
            if not self.depths or not self.dims:
                raise ConfigError("a custom model needs depths and dims, e.g. depths (2, 2, 6, 2) dims (40, 80, 160, "
                                  "320)")
        else:
            object.__setattr__(self, "name", resolve_name(self.name))
            depths, dims = MODEL_SIZES[self.name]
            object.__setattr__(self, "depths", self.depths or depths)
            object.__setattr__(self, "dims", self.dims or dims)
        self._validate()

    def _validate(self) -> None:
        check_stages(self.depths, self.dims, self.patch_size)
        if self.in_chans < 1:
            raise ConfigError(f"in_chans must be >= 1, got {self.in_chans}")
        try:
            grid_size(self.img_size, self.patch_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        kept = self.kept_patches
        if kept == 0 or kept == self.num_patches:
            height, width = self.img_size
            raise ConfigError(
                f"mask_ratio {self.mask_ratio} on a {height}x{width} input keeps {kept} of its {self.num_patches} "
                f"patches of {self.patch_size} px: the encoder would see "
                f"{'nothing' if kept == 0 else 'everything and the loss be 0'}; change the input size or mask ratio"
            )
        if self.decoder_depth < 0 or self.decoder_embed_dim < 1:
            raise ConfigError(f"decoder_depth must be >= 0 and decoder_embed_dim >= 1, got {self.decoder_depth} and "
                              f"{self.decoder_embed_dim}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        # MinkowskiEngine itself is imported only when the backend runs (or a training run asks for it), so a
        # model file written with it loads anywhere.
        check_backend(self.backend)
        if self.init not in INIT_SCHEMES:
            raise ConfigError(f"unknown init {self.init!r}; choose one of {', '.join(INIT_SCHEMES)}")

    # Derived sizes ------------------------------------------------------------------------------------------

    @property
    def grid(self) -> tuple[int, int]:
        """(gh, gw): the patch grid of img_size."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def kept_patches(self) -> int:
        """Patches each image keeps at img_size (the official int(L * (1 - mask_ratio)))."""
        return kept_per_sample(self.num_patches, self.mask_ratio)

    # Conversions --------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON / YAML values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "the model config") -> FCMAEConfig:
        """A config from a mapping of field names; an unknown name fails with a "did you mean" naming `source`."""
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        check_names(values, [f.name for f in dataclasses.fields(cls)], "key", source)
        return cls(**values)

    def to_metadata(self) -> dict[str, str]:
        """What every model file stores about its model: {"format": "fcmae", "config": JSON of to_dict()}."""
        return {"format": MODEL_FORMAT, "config": json.dumps(self.to_dict())}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> FCMAEConfig | None:
        """The config a model file's metadata holds; None if it holds none (not an fcmae model file).

        Files written before FCMAEConfig existed hold the same JSON, without in_chans (3, which they all are).
        """
        if metadata.get("format") != MODEL_FORMAT or "config" not in metadata:
            return None
        try:
            values = json.loads(metadata["config"])
        except json.JSONDecodeError as e:
            raise ConfigError(f"the file's fcmae model config is not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"the file's fcmae model config is not a mapping: {metadata['config'][:80]}")
        return cls.from_dict(values, source="the file's model config")

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> FCMAEConfig | None:
        """The FCMAE model a pretraining run's config (its config.yaml, as a mapping) trains; None when the run
        trains no FCMAE model (a fine-tuning run's `model` is a timm classifier's ClassifierConfig).

        Runs write the model nested (`model: {name: convnextv2_atto, mask_ratio: 0.6, ...}`); runs written before
        held its settings at the top level (`model: convnextv2_atto`, `mask_ratio: 0.6`). Both are read here, the
        one reader of a run's model. The run's `input_size` (H [W]) is the model's img_size.
        """
        model = config.get("model")
        if "finetune" in config or "num_classes" in config:  # finetune.py's fields: a run that trains a classifier
            return None
        if isinstance(model, Mapping):
            values = {str(k).replace("-", "_"): v for k, v in model.items()}
        elif "mask_ratio" in config:  # the flat layout of older runs: the model's fields among the run's
            fields = {f.name for f in dataclasses.fields(cls)} - {"name", "img_size"}
            values = {k: v for k, v in config.items() if k in fields}
            if model is not None:
                values["name"] = model
        else:
            return None
        size = config.get("input_size")
        if size is not None:
            size = list(size) if isinstance(size, (list, tuple)) else [size]
            values["img_size"] = size * 2 if len(size) == 1 else size
        return cls.from_dict(values, source="the run's model config")

    def replace(self, **changes: Any) -> FCMAEConfig:
        """A copy with `changes`, validated. A new name brings its own depths and dims unless they are given (or
        this config's were not the old name's)."""
        check_names(changes, [f.name for f in dataclasses.fields(self)], "key", "FCMAEConfig.replace")
        if "name" in changes and self.name in MODEL_SIZES and (self.depths, self.dims) == MODEL_SIZES[self.name]:
            changes = {"depths": (), "dims": (), **changes}
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ClassifierConfig:
    """A dense ConvNeXt V2 classifier (timm's), as finetune.py trains and evaluates it."""

    name: str = "convnextv2_atto"  # the timm ConvNeXt V2 to fine-tune: atto, femto, pico, nano, tiny, base, ...
    in_chans: int = 3  # input channels of the model (its stem): 3 for RGB
    num_classes: int = 0  # 0: the number of class folders in train/
    drop_path: float = 0.1  # stochastic depth at the last block (off for the linear probe)
    head_init_scale: float = 0.001  # the new classifier's init is scaled by this (official: 0.001, i.e. std 2e-5)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(ClassifierConfig)
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        object.__setattr__(self, "name", resolve_name(self.name))
        for name in ("drop_path", "head_init_scale"):  # coerce stops nan / inf from files and flags; this, from code
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.in_chans < 1:
            raise ConfigError(f"in_chans must be >= 1, got {self.in_chans}")
        if self.num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0 (0: count the class folders), got {self.num_classes}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.head_init_scale <= 0:
            raise ConfigError(f"head_init_scale must be > 0, got {self.head_init_scale}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "the model config") -> ClassifierConfig:
        """A config from a mapping of field names; an unknown name fails with a "did you mean" naming `source`."""
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        check_names(values, [f.name for f in dataclasses.fields(cls)], "key", source)
        return cls(**values)

    def replace(self, **changes: Any) -> ClassifierConfig:
        check_names(changes, [f.name for f in dataclasses.fields(self)], "key", "ClassifierConfig.replace")
        return dataclasses.replace(self, **changes)


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(FCMAEConfig)
