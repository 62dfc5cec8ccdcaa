"""Convert ConvNeXt V2 / FCMAE checkpoints between the official release, timm and this project.

Layouts (the names `detect_layout` returns):

  "fcmae"           this project's FCMAE state dict (`fcmae.save_model`, or the model.safetensors of a training-state
                    folder): `encoder.*` with timm's names and a Linear MLP, `decoder.proj`, `decoder.mask_token`,
                    `decoder.blocks.N.*` (timm block names), `decoder.pred`.
  "timm"            `timm.create_model('convnextv2_*')` weights: `stem.*`, `stages.*`, optional `head.norm` and
                    `head.fc`; the block MLP either Linear (out, in) or 1x1 conv (out, in, 1, 1) (timm's conv_mlp).
  "official-me"     what the official main_pretrain.py saves: a MinkowskiEngine sparse encoder (conv kernels
                    (k*k, C_in, C_out), depthwise kernels (k*k, C), biases (1, C), LayerNorms wrapped as `.ln`,
                    Linears as `.linear`, GRN gamma/beta (1, 4C)) and the dense official decoder (`proj`,
                    `mask_token`, `decoder.N.*`, `pred`).
  "official-dense"  the released dense checkpoints (convnextv2_*_fcmae.pt, fine-tuned files): official names, dense
                    shapes, GRN (1, 1, 1, 4C); with or without the `encoder.` prefix, the decoder, and a classifier
                    (`norm`, `head`).

Every input is first brought to the "fcmae" layout (a classifier keeps timm's `head.norm` / `head.fc` names), checked
against the model its shapes describe, then handed out as timm weights (`to_timm`) or a full FCMAE model
(`to_fcmae`). Nothing is dropped silently: what is left out or freshly initialized is listed in `Conversion.notes`
(and logged), and whatever does not fit fails with the offending keys.

CLI:  python -m fcmae.convert INPUT OUTPUT --to {timm,fcmae,transformers,official} [--model NAME] [--no-strict] ...
      (--to transformers, --to official and --to timm into a folder are written by `fcmae.exports`)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import timm
import torch
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from torch import Tensor, nn

from .config import OneLineArgumentParser
from .fcmae import FCMAE
from .model_config import FCMAEConfig
from .models import (
    MODEL_SIZES, format_keys, load_state_dict_strict, read_model_file, resolve_name, save_model, write_safetensors,
)

__all__ = [
    "LAYOUTS", "TARGETS", "KEY_TABLE", "Conversion", "load_checkpoint", "detect_layout", "convert", "to_timm",
    "to_fcmae", "save_conversion", "me_conv_to_dense", "dense_conv_to_me", "me_depthwise_to_dense",
    "dense_depthwise_to_me", "main",
]

log = logging.getLogger(__name__)

LAYOUTS = ("fcmae", "timm", "official-me", "official-dense")
TARGETS = ("timm", "fcmae")
CUSTOM = "custom"  # the model name of an encoder that matches no named size
SEED = 0  # a fresh decoder is drawn from this seed, so a conversion gives the same file every time

StateDict = dict[str, Tensor]
Source = str | os.PathLike | Mapping[str, Any]


# MinkowskiEngine kernel math --------------------------------------------------------------------------------
# An ME kernel holds one (C_in, C_out) matrix per kernel offset; offset n sits at row n % k, column n // k of the
# dense k x k window (the first spatial coordinate runs fastest), hence the final transpose of the last two dims.


def me_conv_to_dense(kernel: Tensor) -> Tensor:
    """MinkowskiEngine conv kernel (k*k, C_in, C_out) -> dense conv weight (C_out, C_in, k, k)."""
    k = _kernel_side(kernel, 3, "(k*k, C_in, C_out)")
    _, c_in, c_out = kernel.shape
    return kernel.permute(2, 1, 0).reshape(c_out, c_in, k, k).transpose(-1, -2).contiguous()


def dense_conv_to_me(weight: Tensor) -> Tensor:
    """Dense conv weight (C_out, C_in, k, k) -> MinkowskiEngine conv kernel (k*k, C_in, C_out); inverts
    `me_conv_to_dense` exactly."""
    c_out, c_in, k, _ = weight.shape
    return weight.transpose(-1, -2).reshape(c_out, c_in, k * k).permute(2, 1, 0).contiguous()


def me_depthwise_to_dense(kernel: Tensor) -> Tensor:
    """MinkowskiEngine depthwise kernel (k*k, C) -> dense depthwise conv weight (C, 1, k, k)."""
    k = _kernel_side(kernel, 2, "(k*k, C)")
    return kernel.permute(1, 0).reshape(kernel.shape[1], 1, k, k).transpose(-1, -2).contiguous()


def dense_depthwise_to_me(weight: Tensor) -> Tensor:
    """Dense depthwise conv weight (C, 1, k, k) -> MinkowskiEngine depthwise kernel (k*k, C); inverts
    `me_depthwise_to_dense` exactly."""
    channels, _, k, _ = weight.shape
    return weight.transpose(-1, -2).reshape(channels, k * k).permute(1, 0).contiguous()


def _kernel_side(kernel: Tensor, ndim: int, expected: str) -> int:
    side = math.isqrt(kernel.shape[0]) if kernel.ndim == ndim else 0
    if side == 0 or side * side != kernel.shape[0]:
        raise ValueError(f"expected a kernel of shape {expected} with a square number of offsets")
    return side


def _row_to_vector(row: Tensor) -> Tensor:
    """(1, C) ME biases and GRN parameters, (1, 1, 1, C) dense GRN parameters -> (C,)."""
    if row.ndim == 0 or any(size != 1 for size in row.shape[:-1]):
        raise ValueError("expected a row of shape (1, C) or (1, 1, 1, C)")
    return row.reshape(row.shape[-1])


# How an official tensor becomes ours; `KeyRule.kind` names one of these.
_CONVERSIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "conv": me_conv_to_dense, "dwconv": me_depthwise_to_dense, "row": _row_to_vector,
}


# The key table -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRule:
    """One parameter under its names in the three layouts. Placeholders: {s} stage, {b} block, {i} 1 or 2 (the
    MLP's first or second Linear), {w} weight or bias.

    ours:     the "fcmae" name (the "timm" name is the same without `encoder.`).
    official: the "official-dense" name (with the `encoder.` prefix, which dense files may lack).
    me:       the "official-me" name where it differs from `official`.
    kind:     conversion of the official-dense tensor to ours (a key of _CONVERSIONS), None for none.
    me_kind:  the same for the official-me tensor, where it differs from `kind`.
    """

    ours: str
    official: str
    me: str | None = None
    kind: str | None = None
    me_kind: str | None = None


_OUR_BLOCK = "encoder.stages.{s}.blocks.{b}"
_OFFICIAL_BLOCK = "encoder.stages.{s}.{b}"
KEY_TABLE: tuple[KeyRule, ...] = (
    # Encoder. The stem is a dense conv and LayerNorm in the ME model too.
    KeyRule("encoder.stem.0.{w}", "encoder.downsample_layers.0.0.{w}"),
    KeyRule("encoder.stem.1.{w}", "encoder.downsample_layers.0.1.{w}"),
    KeyRule("encoder.stages.{s}.downsample.0.{w}", "encoder.downsample_layers.{s}.0.{w}",
            me="encoder.downsample_layers.{s}.0.ln.{w}"),
    KeyRule("encoder.stages.{s}.downsample.1.weight", "encoder.downsample_layers.{s}.1.weight",
            me="encoder.downsample_layers.{s}.1.kernel", me_kind="conv"),
    KeyRule("encoder.stages.{s}.downsample.1.bias", "encoder.downsample_layers.{s}.1.bias", me_kind="row"),
    KeyRule(f"{_OUR_BLOCK}.conv_dw.weight", f"{_OFFICIAL_BLOCK}.dwconv.weight",
            me=f"{_OFFICIAL_BLOCK}.dwconv.kernel", me_kind="dwconv"),
    KeyRule(f"{_OUR_BLOCK}.conv_dw.bias", f"{_OFFICIAL_BLOCK}.dwconv.bias", me_kind="row"),
    KeyRule(f"{_OUR_BLOCK}.norm.{{w}}", f"{_OFFICIAL_BLOCK}.norm.{{w}}", me=f"{_OFFICIAL_BLOCK}.norm.ln.{{w}}"),
    KeyRule(f"{_OUR_BLOCK}.mlp.fc{{i}}.{{w}}", f"{_OFFICIAL_BLOCK}.pwconv{{i}}.{{w}}",
            me=f"{_OFFICIAL_BLOCK}.pwconv{{i}}.linear.{{w}}"),
    KeyRule(f"{_OUR_BLOCK}.mlp.grn.weight", f"{_OFFICIAL_BLOCK}.grn.gamma", kind="row"),
    KeyRule(f"{_OUR_BLOCK}.mlp.grn.bias", f"{_OFFICIAL_BLOCK}.grn.beta", kind="row"),
    # Decoder: dense in both official layouts, and without the `decoder.` prefix on proj, mask_token and pred.
    KeyRule("decoder.proj.{w}", "proj.{w}"),
    KeyRule("decoder.mask_token", "mask_token"),
    KeyRule("decoder.blocks.{b}.conv_dw.{w}", "decoder.{b}.dwconv.{w}"),
    KeyRule("decoder.blocks.{b}.norm.{w}", "decoder.{b}.norm.{w}"),
    KeyRule("decoder.blocks.{b}.mlp.fc{i}.{w}", "decoder.{b}.pwconv{i}.{w}"),
    KeyRule("decoder.blocks.{b}.mlp.grn.weight", "decoder.{b}.grn.gamma", kind="row"),
    KeyRule("decoder.blocks.{b}.mlp.grn.bias", "decoder.{b}.grn.beta", kind="row"),
    KeyRule("decoder.pred.{w}", "pred.{w}"),
    # Classifier of fine-tuned official files: final LayerNorm and Linear, timm's head.norm and head.fc.
    KeyRule("head.norm.{w}", "norm.{w}"),
    KeyRule("head.fc.{w}", "head.{w}"),
)  # fmt: skip

_FIELDS = {"s": r"(?P<s>\d+)", "b": r"(?P<b>\d+)", "i": r"(?P<i>[12])", "w": r"(?P<w>weight|bias)"}


def _regex(template: str) -> re.Pattern[str]:
    """'a.{s}.{w}' -> a regex whose named groups fill the same placeholders of another template."""
    parts = re.split(r"\{(\w)\}", template)  # literal text at even indices, placeholder names at odd ones
    return re.compile("".join(re.escape(p) if i % 2 == 0 else _FIELDS[p] for i, p in enumerate(parts)))


# Per official layout: (regex of the official name, our name template, conversion or None).
_RULES: dict[str, list[tuple[re.Pattern[str], str, str | None]]] = {
    "official-dense": [(_regex(r.official), r.ours, r.kind) for r in KEY_TABLE],
    "official-me": [(_regex(r.me or r.official), r.ours, r.me_kind or r.kind) for r in KEY_TABLE],
}

_SIGNATURES = {  # a key that only this layout has
    "fcmae": re.compile(r"encoder\.(stem|stages\.\d+\.(blocks|downsample))\."),
    "timm": re.compile(r"(stem|stages\.\d+\.(blocks|downsample))\."),
    "official": re.compile(r"(encoder\.)?(downsample_layers\.\d+|stages\.\d+\.\d+)\."),
}
_ME_SIGNATURE = re.compile(r"\.(kernel|ln\.(weight|bias)|linear\.(weight|bias))$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel and torch.compile


# Reading checkpoints -----------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """Read the weights of a checkpoint file or training-state folder, never unpickling arbitrary objects.

    Accepts a safetensors file; a torch.save file (.pt/.pth/.bin), read with weights_only=True, bare or wrapped as
    {'model': state_dict, ...} or {'state_dict': ...} (an official checkpoint's argparse.Namespace 'args' is
    allowed, nothing else); or a folder holding model.safetensors or pytorch_model.bin (Accelerate's save_state).

    Returns:
        (state dict of tensors, metadata): the safetensors metadata, or for a torch file {"args": JSON of the
        checkpoint's plain-valued args} when it has any.
    Raises:
        FileNotFoundError, or ValueError with a one-line reason for anything that is not a readable checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return load_checkpoint(path / name)
        raise ValueError(f"{path} is a folder without model.safetensors or pytorch_model.bin")
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if _looks_like_safetensors(path):
        return read_model_file(path)
    return _unwrap(_torch_load(path), str(path))


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return path.suffix == ".safetensors" or head[8:9] == b"{"


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True; an official checkpoint's argparse.Namespace is the one extra type."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is advice (which we must not pass on: weights_only=False) around the actual reason.
        reason = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Please use|Check the documentation|$)", str(e),
                           re.DOTALL)
        reason_text = " ".join(reason[1].split()).rstrip(".") if reason else ""
        if reason_text and not reason_text.startswith("Unsupported operand"):  # operand: not a pickle at all
            raise ValueError(f"{path} holds Python objects that safe loading refuses ({reason_text}); "
                             "it was not loaded") from None
        raise ValueError(f"{path} is not a PyTorch or safetensors checkpoint") from None
    except Exception as e:  # torch raises RuntimeError, KeyError, EOFError... for foreign or truncated files
        raise ValueError(f"{path} is not a readable PyTorch or safetensors checkpoint ({_first_line(e)})") from None


def _unwrap(obj: Any, where: str) -> tuple[StateDict, dict[str, str]]:
    """The state dict inside a loaded checkpoint (bare, or under 'model' / 'state_dict'), and metadata."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} is not a checkpoint: it holds a {type(obj).__name__}, not a dict of tensors")
    container = next((k for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)), None)
    state = obj[container] if container else obj
    if not any(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{where} holds no model weights (keys: {', '.join(map(str, list(state)[:8]))})")
    bad = [str(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise ValueError(f"{where}: entries that are not named tensors among the weights: {', '.join(bad[:8])}")
    metadata = {}
    args = vars(obj["args"]) if isinstance(obj.get("args"), argparse.Namespace) else obj.get("args")
    if container and isinstance(args, Mapping):
        plain = {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool)) or v is None}
        metadata["args"] = json.dumps(plain)
    return dict(state), metadata


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# Layouts ----------------------------------------------------------------------------------------------------


def detect_layout(state: Mapping[str, Any]) -> str:
    """Which of LAYOUTS a state dict is in, from its key names (see the module docstring).

    Raises ValueError if no key looks like a ConvNeXt V2 encoder key.
    """
    for layout in ("fcmae", "timm", "official"):
        if any(_SIGNATURES[layout].match(k) for k in state):
            if layout == "official":
                return "official-me" if any(_ME_SIGNATURE.search(k) for k in state) else "official-dense"
            return layout
    raise ValueError(f"no ConvNeXt V2 encoder weights found (keys: {', '.join(list(state)[:6])} ...)")


def _strip_wrappers(state: StateDict) -> StateDict:
    """Drop the `module.` / `_orig_mod.` prefixes that DDP and torch.compile put on every key."""
    while state and (prefix := next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _to_fcmae_names(state: StateDict, layout: str, where: str) -> tuple[StateDict, dict[str, str]]:
    """Rename (and, for the official layouts, reshape) every tensor to the "fcmae" layout.

    Returns the renamed state and a map from new names to the input's names (for messages). Keys that no rule
    knows, and tensors whose shapes the official->ours conversion cannot apply to, fail here, all listed at once.
    """
    if layout == "fcmae":
        return dict(state), {k: k for k in state}
    out: StateDict = {}
    origin: dict[str, str] = {}
    unknown, bad_shapes = [], []
    for key, value in state.items():
        if layout == "timm":
            if key.startswith("head."):
                name = key
            else:
                name = "encoder." + key
                if value.ndim == 4 and value.shape[2:] == (1, 1) and ".mlp.fc" in key:
                    value = value.reshape(value.shape[:2])  # conv_mlp: a 1x1 conv is a Linear
        else:
            full = "encoder." + key if key.startswith(("downsample_layers.", "stages.")) else key
            match = next(((m, ours, kind) for rx, ours, kind in _RULES[layout] if (m := rx.fullmatch(full))), None)
            if match is None:
                unknown.append(key)
                continue
            m, ours, kind = match
            name = ours.format(**m.groupdict())
            if kind:
                try:
                    value = _CONVERSIONS[kind](value)
                except ValueError as e:
                    bad_shapes.append(f"{key}: {tuple(value.shape)} ({e})")
                    continue
        if name in out:
            unknown.append(f"{key} (a second copy of {origin[name]})")
            continue
        out[name], origin[name] = value, key
    problems = [f"unexpected {format_keys(unknown)}" if unknown else "",
                f"shape mismatch {format_keys(bad_shapes)}" if bad_shapes else ""]
    if unknown or bad_shapes:
        raise ValueError(f"{where} ({layout} layout) has keys that do not convert: "
                         + "; ".join(p for p in problems if p))
    return out, origin


# Model shapes -----------------------------------------------------------------------------------------------


def _infer_encoder(state: StateDict, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(depths, dims) of the encoder in an "fcmae"-layout state: blocks per stage, and each stage's width."""
    stage_blocks: dict[int, set[int]] = {}
    for key in state:
        if m := re.match(r"encoder\.stages\.(\d+)\.(?:blocks\.(\d+)\.)?", key):
            stage_blocks.setdefault(int(m[1]), set()).update([int(m[2])] if m[2] else [])
    if not stage_blocks:
        raise ValueError(f"{where} has no encoder stages")
    if max(stage_blocks) != 3:  # timm's ConvNeXt V2 and the FCMAE grid (stride 32) assume four stages
        raise ValueError(f"{where} has {max(stage_blocks) + 1} encoder stages; ConvNeXt V2 has 4")
    depths, dims = [], []
    for s in range(max(stage_blocks) + 1):
        blocks = stage_blocks.get(s, set())
        depths.append(max(blocks) + 1 if blocks else 0)
        # The width is the output channels of the stage's first layer, or failing that of any of its blocks.
        candidates = ["encoder.stem.0.weight", "encoder.stem.1.weight"] if s == 0 else [
            f"encoder.stages.{s}.downsample.1.weight", f"encoder.stages.{s}.downsample.1.bias"]
        candidates += [f"encoder.stages.{s}.blocks.{b}.{p}" for b in sorted(blocks)
                       for p in ("conv_dw.weight", "conv_dw.bias", "norm.weight")]
        found = next((state[k].shape[0] for k in candidates if k in state and state[k].ndim >= 1), None)
        if found is None:
            raise ValueError(f"cannot tell the width of encoder stage {s}: {where} has none of its weights")
        dims.append(int(found))
    return tuple(depths), tuple(dims)


def _infer_decoder(state: StateDict, where: str) -> tuple[int, int] | None:
    """(depth, width) of the decoder in an "fcmae"-layout state, None if it has no decoder weights."""
    keys = [k for k in state if k.startswith("decoder.")]
    if not keys:
        return None
    blocks = {int(m[1]) for k in keys if (m := re.match(r"decoder\.blocks\.(\d+)\.", k))}
    candidates = [("decoder.proj.weight", 0), ("decoder.mask_token", 1), ("decoder.pred.weight", 1)]
    candidates += [(f"decoder.blocks.{b}.conv_dw.weight", 0) for b in sorted(blocks)]
    width = next((state[k].shape[dim] for k, dim in candidates if k in state and state[k].ndim > dim), None)
    if width is None:
        raise ValueError(f"cannot tell the decoder width: {where} has no proj, mask_token, pred or block weights")
    return (max(blocks) + 1 if blocks else 0), int(width)


def _named_size(depths: Sequence[int], dims: Sequence[int]) -> str | None:
    return next((n for n, (d, w) in MODEL_SIZES.items() if tuple(d) == tuple(depths) and tuple(w) == tuple(dims)), None)


def _model_name(model: str | None, depths: tuple[int, ...], dims: tuple[int, ...], hints: dict[str, Any],
                source: str) -> str:
    """The model name: `model` if given (it must fit), else the one an fcmae file records for these shapes, else
    the named size with these depths and dims, else CUSTOM."""
    match = _named_size(depths, dims)
    if model is not None:
        name = resolve_name(model)
        if (tuple(MODEL_SIZES[name][0]), tuple(MODEL_SIZES[name][1])) != (depths, dims):
            hint = f"it is a {match}" if match else "a custom size: leave the model name out"
            raise ValueError(f"model {name} does not fit {source}: its encoder has depths {_csv(depths)} and dims "
                             f"{_csv(dims)}, {name} has depths {_csv(MODEL_SIZES[name][0])} and dims "
                             f"{_csv(MODEL_SIZES[name][1])} ({hint})")
        return name
    if hints.get("name") and hints.get("depths") == list(depths) and hints.get("dims") == list(dims):
        return hints["name"]
    return match or CUSTOM


def _settings_hints(metadata: Mapping[str, str]) -> dict[str, Any]:
    """FCMAE settings the input records: the config of an fcmae file, or an official checkpoint's args."""
    if metadata.get("format") == "fcmae" and "config" in metadata:
        return json.loads(metadata["config"])
    if "args" in metadata:
        args = json.loads(metadata["args"])
        renames = {"input_size": "img_size", "mask_ratio": "mask_ratio", "norm_pix_loss": "norm_pix_loss"}
        return {ours: args[theirs] for theirs, ours in renames.items() if args.get(theirs) is not None}
    return {}


def _csv(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


# Conversion -------------------------------------------------------------------------------------------------


@dataclass
class Conversion:
    """What `convert` produced.

    state:    the weights in the target layout ("timm": timm names and shapes, the MLP as 1x1 convs when
              conv_mlp; "fcmae": the full FCMAE state dict).
    target:   "timm" or "fcmae".
    layout:   the input's layout (one of LAYOUTS).
    name:     the model name ("convnextv2_atto", ..., or "custom").
    config:   the FCMAE config (as `FCMAE.config`); for "timm" the decoder entries describe no weights.
    source:   the input path, or "<state dict>".
    conv_mlp: "timm" target: whether the MLP is written as 1x1 convs; None for "fcmae".
    model:    "fcmae" target: the FCMAE model holding `state`; None for "timm".
    notes:    one line each: what was detected, and what was left out or freshly initialized.
    """

    state: StateDict
    target: str
    layout: str
    name: str
    config: dict[str, Any]
    source: str
    conv_mlp: bool | None = None
    model: FCMAE | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments beyond the name that `timm.create_model` needs for these weights."""
        kwargs: dict[str, Any] = {}
        if self.name not in MODEL_SIZES or list(MODEL_SIZES[self.name][0]) != self.config["depths"] or \
                list(MODEL_SIZES[self.name][1]) != self.config["dims"]:
            kwargs.update(depths=tuple(self.config["depths"]), dims=tuple(self.config["dims"]))
        if self.conv_mlp is not None and self.conv_mlp != _timm_default_conv_mlp(self.timm_name):
            kwargs["conv_mlp"] = self.conv_mlp
        return kwargs

    @property
    def timm_name(self) -> str:
        """The timm model to build for these weights (a custom size builds on atto's constructor)."""
        return self.name if self.name in MODEL_SIZES else "convnextv2_atto"


def convert(
    source: Source,
    to: str,
    model: str | None = None,
    *,
    conv_mlp: bool | None = None,
    decoder_depth: int | None = None,
    decoder_embed_dim: int | None = None,
    strict: bool = True,
    drop_head: bool = False,
) -> Conversion:
    """Convert a checkpoint of any layout in LAYOUTS to timm weights or a full FCMAE model.

    Args:
        source: a path (see `load_checkpoint`) or a state dict, bare or wrapped as {'model': state_dict}.
        to: "timm" or "fcmae".
        model: model name ("atto" or "convnextv2_atto"); None to infer it from the shapes. Given, it must fit.
        conv_mlp: "timm" target: write the MLP as 1x1 convs (True) or Linear (False); None for timm's default of
            the model (1x1 convs for atto, femto, pico and nano, Linear from tiny up, Linear for a custom size).
        decoder_depth, decoder_embed_dim: "fcmae" target: shape of a fresh decoder when the input has none
            (defaults 1 and 512); they must agree with an input decoder.
        strict: when False, a partial decoder is completed with fresh weights, a partial classifier head is
            written as it is, and a classifier head is dropped for the "fcmae" target; each is listed in `notes`.
            Keys that fit nothing and shape mismatches fail either way.
        drop_head: leave out the input's classifier head (e.g. to fine-tune with other classes, or to pretrain
            further from a fine-tuned model).
    Returns:
        a Conversion; `.state` holds the converted weights.
    Raises:
        ValueError (one line) for anything that is not a convertible checkpoint or does not fit.
    """
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; choose one of {', '.join(TARGETS)}")
    if isinstance(source, Mapping):
        state, metadata = _unwrap(source, "the state dict")
        where = "<state dict>"
    else:
        state, metadata = load_checkpoint(source)
        where = str(source)
    state = _strip_wrappers(state)
    try:
        layout = detect_layout(state)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    state, origin = _to_fcmae_names(state, layout, where)

    depths, dims = _infer_encoder(state, where)
    hints = _settings_hints(metadata)
    name = _model_name(model, depths, dims, hints, where)
    found_decoder = _infer_decoder(state, where)
    head = sorted(k for k in state if k.startswith("head."))
    unknown = sorted(k for k in state if not k.startswith(("encoder.", "decoder.", "head.")))
    if unknown:
        raise ValueError(f"{where} does not fit {name}: unexpected {format_keys([origin[k] for k in unknown])}")

    depth, width = _decoder_shape(found_decoder, decoder_depth, decoder_embed_dim, where)
    settings = {k: hints[k] for k in ("img_size", "mask_ratio", "norm_pix_loss", "drop_path_rate", "backend")
                if k in hints}
    config = dict(name=name, depths=list(depths), dims=list(dims), patch_size=4 * 2 ** (len(depths) - 1),
                  decoder_depth=depth, decoder_embed_dim=width, **settings)
    notes = [f"detected {layout} layout in {where}: {name} (depths {_csv(depths)}, dims {_csv(dims)}), "
             + (f"decoder depth {depth} width {width}, " if found_decoder else "no decoder, ")
             + (_describe_head(state, head) if head else "no classifier head")]

    if to == "timm":
        out, use_conv_mlp = _finish_timm(state, origin, config, head, conv_mlp, strict, drop_head, where, notes)
        result = Conversion(out, to, layout, name, config, where, conv_mlp=use_conv_mlp, notes=notes)
    else:
        fcmae_model = _finish_fcmae(state, origin, config, head, found_decoder is not None, strict, drop_head,
                                    where, notes)
        result = Conversion(fcmae_model.state_dict(), to, layout, name, fcmae_model.config.to_dict(), where,
                            model=fcmae_model, notes=notes)
    for note in notes:
        log.info(note)
    return result


def _decoder_shape(found: tuple[int, int] | None, depth: int | None, width: int | None, where: str) -> tuple[int, int]:
    """(depth, width) of the decoder: the input's, which the requested values must match, or the requested ones."""
    if found is None:
        return (1 if depth is None else depth), (512 if width is None else width)
    if (depth is not None and depth != found[0]) or (width is not None and width != found[1]):
        asked = " and ".join(f"{name} {value}" for name, value in (("depth", depth), ("width", width)) if value)
        raise ValueError(f"{where} has a decoder of depth {found[0]} and width {found[1]}, not the requested "
                         f"{asked}: set --decoder-depth {found[0]} --decoder-embed-dim {found[1]} "
                         "(the requested sizes only shape a fresh decoder, for inputs without one)")
    return found


def _describe_head(state: StateDict, head: list[str]) -> str:
    if "head.fc.weight" in state:
        return f"classifier head ({state['head.fc.weight'].shape[0]} classes)"
    return "head norm without a classifier (a timm model with num_classes=0)"


def _meta_copy(state: StateDict) -> StateDict:
    """Shape-only copies, to check a state against a model built on the meta device."""
    return {k: v.to("meta") for k, v in state.items()}


def _finish_timm(state: StateDict, origin: dict[str, str], config: dict[str, Any], head: list[str],
                 conv_mlp: bool | None, strict: bool, drop_head: bool, where: str,
                 notes: list[str]) -> tuple[StateDict, bool]:
    """The encoder (and classifier head) in timm's names, checked against the timm model it will load into.
    Returns the weights and whether their MLP is in timm's conv_mlp form. Appends to `notes`."""
    decoder = [k for k in state if k.startswith("decoder.")]
    if decoder:
        notes.append(f"dropped the decoder ({len(decoder)} tensors): a timm model has none")
    with torch.device("meta"):
        reference = FCMAE(FCMAEConfig.from_dict(config))
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    load_state_dict_strict(reference.encoder, _meta_copy(encoder), source=f"{where} ({config['name']} encoder)")

    out = dict(encoder)
    if head and drop_head:
        notes.append(f"dropped the classifier head ({format_keys([origin[k] for k in head])}) as asked")
    elif head:
        required = {"head.norm.weight", "head.norm.bias"}
        if any(k.startswith("head.fc.") for k in head):
            required |= {"head.fc.weight", "head.fc.bias"}
        missing = sorted(required - set(head))
        if missing and strict:
            raise ValueError(f"{where} has a partial classifier head: missing {format_keys(missing)} "
                             "(non-strict conversion writes the rest; or drop the head)")
        if missing:
            notes.append(f"non-strict: the classifier head lacks {format_keys(missing)}; wrote the rest")
        out.update({k: state[k] for k in head})

    num_classes = out["head.fc.weight"].shape[0] if "head.fc.weight" in out else 0
    timm_model = _timm_model(config["name"], config["depths"], config["dims"], conv_mlp, num_classes)
    use_conv_mlp = _uses_conv_mlp(timm_model)
    if use_conv_mlp:  # timm's conv_mlp form: the MLP's Linears as 1x1 convs
        out = {k: v[:, :, None, None] if ".mlp.fc" in k and k.endswith(".weight") else v for k, v in out.items()}
    # The weights must load into timm with at most head.* missing: check with timm's own head filled in.
    expected = timm_model.state_dict()
    full = {**{k: v for k, v in expected.items() if k.startswith("head.")}, **_meta_copy(out)}
    load_state_dict_strict(timm_model, full, source=f"{where} (timm {config['name']})")
    return out, use_conv_mlp


def _finish_fcmae(state: StateDict, origin: dict[str, str], config: dict[str, Any], head: list[str],
                  has_decoder: bool, strict: bool, drop_head: bool, where: str, notes: list[str]) -> FCMAE:
    """A full FCMAE model: the input's encoder and decoder, a fresh decoder where the input has none.
    Appends to `notes`."""
    if head and strict and not drop_head:
        raise ValueError(f"{where} has a classifier head ({format_keys([origin[k] for k in head])}) that an FCMAE "
                         "model has no place for; pass --drop-head to leave it out")
    if head:
        notes.append(f"dropped the classifier head ({format_keys([origin[k] for k in head])})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = FCMAE(FCMAEConfig.from_dict(config))
    weights = {k: v for k, v in state.items() if not k.startswith("head.")}
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith("decoder.") and k not in weights}
    if not has_decoder:
        notes.append(f"no decoder in the input: initialized a fresh one (depth {config['decoder_depth']}, width "
                     f"{config['decoder_embed_dim']}) with the model's own init")
        weights.update(fresh)
    elif fresh and not strict:
        notes.append(f"non-strict: initialized {len(fresh)} decoder tensor(s) missing from the input: "
                     f"{format_keys(sorted(fresh))}")
        weights.update(fresh)
    load_state_dict_strict(model, weights, source=f"{where} ({config['name']})")
    return model


def _timm_model(name: str, depths: Sequence[int], dims: Sequence[int], conv_mlp: bool | None,
                num_classes: int) -> nn.Module:
    """timm's ConvNeXt V2 of this size on the meta device; conv_mlp None keeps timm's default for the name."""
    kwargs: dict[str, Any] = dict(depths=tuple(depths), dims=tuple(dims), num_classes=num_classes)
    if conv_mlp is not None:
        kwargs["conv_mlp"] = conv_mlp
    with torch.device("meta"):
        if name in MODEL_SIZES:
            return timm.create_model(name, pretrained=False, **kwargs)
        return ConvNeXt(use_grn=True, ls_init_value=None, **kwargs)  # what timm's convnextv2_* build


def _uses_conv_mlp(timm_model: nn.Module) -> bool:
    block = next((m for m in timm_model.modules() if isinstance(m, ConvNeXtBlock)), None)
    return bool(block is not None and block.use_conv_mlp)


def _timm_default_conv_mlp(name: str) -> bool:
    if name not in MODEL_SIZES:
        return False
    depths, dims = MODEL_SIZES[name]
    return _uses_conv_mlp(_timm_model(name, depths, dims, None, 0))


def to_timm(source: Source, model: str | None = None, *, conv_mlp: bool | None = None, strict: bool = True,
            drop_head: bool = False) -> StateDict:
    """Dense encoder weights in timm's layout, for `timm.create_model(model, num_classes=K)` with timm's default
    conv_mlp (pass conv_mlp to match a model built otherwise); only `head.*` may be missing when loading.

    Example: `timm_model.load_state_dict(to_timm("pretrain/checkpoint", model="atto"), strict=False)`.
    See `convert` for the arguments.
    """
    return convert(source, "timm", model, conv_mlp=conv_mlp, strict=strict, drop_head=drop_head).state


def to_fcmae(source: Source, model: str | None = None, *, decoder_depth: int | None = None,
             decoder_embed_dim: int | None = None, strict: bool = True, drop_head: bool = False) -> StateDict:
    """The full FCMAE state dict (encoder, decoder, mask token), with a fresh decoder if the input has none.

    See `convert` for the arguments; `convert(...).model` is the model itself.
    """
    return convert(source, "fcmae", model, decoder_depth=decoder_depth, decoder_embed_dim=decoder_embed_dim,
                   strict=strict, drop_head=drop_head).state


# Writing and the CLI ----------------------------------------------------------------------------------------


def save_conversion(result: Conversion, path: str | os.PathLike) -> None:
    """Write a Conversion as safetensors: an fcmae model file (`fcmae.save_model`) or timm weights whose metadata
    records the source, its layout, the model name and the timm settings. Atomic, like `save_model`."""
    provenance = {"source": result.source, "layout": result.layout}
    if result.target == "fcmae":
        assert result.model is not None
        save_model(result.model, path, provenance)
        return
    metadata = {"format": "timm", "model": result.name, "timm_model": result.timm_name,
                "timm_kwargs": json.dumps(result.timm_kwargs), "depths": _csv(result.config["depths"]),
                "dims": _csv(result.config["dims"]), "conv_mlp": str(result.conv_mlp).lower(), **provenance}
    write_safetensors(result.state, path, metadata)


# The options that only make sense for one target (argparse dest -> target; None when not given).
_TARGET_OPTIONS = {"conv_mlp": "timm", "decoder_depth": "fcmae", "decoder_embed_dim": "fcmae"}
CLI_TARGETS = (*TARGETS, "transformers", "official")


def _check_output(source: str, output: str, overwrite: bool, suffixes: tuple[str, ...] = (".safetensors",)) -> None:
    """The output is a .safetensors file (timm and fcmae.load_model pick the reader by suffix; an export may allow
    other `suffixes`), and never the input itself: converting a model file onto itself would replace it, decoder and
    all, with the converted weights. Another existing file is replaced only with --overwrite (it may be a run's
    model.safetensors)."""
    out, src = Path(output), Path(source)
    if out.suffix not in suffixes:
        raise ValueError(f"the output must be a {' or '.join(suffixes)} file, got {output}")
    read = src / "model.safetensors" if src.is_dir() else src
    if out.exists() and read.exists() and out.samefile(read):
        raise ValueError(f"the output {output} is the input file; write the conversion to a new file")
    if out.is_file() and not overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it, or choose another output file")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="fcmae-convert",
        description="Convert ConvNeXt V2 / FCMAE checkpoints (this project's, official MinkowskiEngine or dense, "
                    "timm) to timm weights or a Hub-ready timm folder, a full FCMAE model file, a Hugging Face "
                    "transformers folder, or the official dense layout.",
    )
    parser.add_argument("input", help="model.safetensors, a training-state folder, an official .pt/.pth, or timm "
                                      "weights")
    parser.add_argument("output", help="the .safetensors file to write; a folder for --to transformers, and for "
                                       "--to timm (Hub-ready) when not named .safetensors; .pth or .safetensors for "
                                       "--to official")
    parser.add_argument("--to", required=True, choices=CLI_TARGETS,
                        help="timm: weights (or a folder) for timm.create_model; fcmae: a model file for "
                             "fcmae.load_model; transformers: a folder for ConvNextV2Model.from_pretrained; official: "
                             "the official dense layout (downsample_layers.*, stages.*)")
    parser.add_argument("--model", help="model name, e.g. atto or convnextv2_tiny (default: inferred from shapes)")
    parser.add_argument("--conv-mlp", action=argparse.BooleanOptionalAction, default=None,
                        help="--to timm: MLP as 1x1 convs or Linear (default: timm's default for the model)")
    parser.add_argument("--decoder-depth", type=int, help="--to fcmae: depth of a fresh decoder (default 1)")
    parser.add_argument("--decoder-embed-dim", type=int, help="--to fcmae: width of a fresh decoder (default 512)")
    parser.add_argument("--no-strict", dest="strict", action="store_false",
                        help="allow a partial decoder or head, drop a classifier head for --to fcmae; reports skips")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never the input; a "
                                                                      "folder only if it holds an earlier export)")
    parser.add_argument("--drop-head", action="store_true", default=None,
                        help="leave out the input's classifier head")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the exported folder to this Hugging Face Hub "
                                                              "model repo (needs huggingface_hub and a login)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with a one-line `error:` on stderr for a bad input)."""
    try:
        args = _parser().parse_args(argv)
        misplaced = [(f"--{o.replace('_', '-')}", t) for o, t in _TARGET_OPTIONS.items()
                     if t != args.to and getattr(args, o) is not None]
        if misplaced:
            verb = "apply" if len(misplaced) > 1 else "applies"
            raise ValueError(f"{', '.join(o for o, _ in misplaced)} {verb} only to --to {misplaced[0][1]}")
        from .exports import cli as exports  # imports this module: loaded on use

        if exports.is_export(args.to, args.output) or args.push_to_hub:
            print("\n".join(exports.export(args.input, args.output, args.to, args.model, conv_mlp=args.conv_mlp,
                                            strict=args.strict, drop_head=bool(args.drop_head),
                                            overwrite=args.overwrite, push_to_hub=args.push_to_hub)))
            return 0
        _check_output(args.input, args.output, args.overwrite)
        result = convert(args.input, args.to, args.model, conv_mlp=args.conv_mlp, decoder_depth=args.decoder_depth,
                         decoder_embed_dim=args.decoder_embed_dim, strict=args.strict, drop_head=bool(args.drop_head))
        save_conversion(result, args.output)
    except (ValueError, OSError) as e:  # user mistakes: one line, no traceback
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print("\n".join(result.notes))
    print(f"wrote {len(result.state)} {args.to} tensors to {args.output}")
    if args.to == "timm":
        extra = "".join(f", {k}={v!r}" for k, v in result.timm_kwargs.items())
        print(f"use: timm.create_model({result.timm_name!r}, num_classes=K{extra}, pretrained=True, "
              f"pretrained_cfg_overlay=dict(file={str(args.output)!r}))")
    else:
        print(f"use: fcmae.load_model({str(args.output)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
