"""`convert`: any layout that `fcmae.checkpoints.load` reads -> timm weights or a full FCMAE model.

Every input is first brought to the "fcmae" layout (a classifier keeps timm's `head.norm` / `head.fc` names), checked
against the model its shapes describe, then handed out as timm weights (`to_timm`) or a full FCMAE model
(`to_fcmae`). Nothing is dropped silently: what is left out or freshly initialized is listed in `Conversion.notes`
(and logged), and whatever does not fit fails with the offending keys.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import timm
import torch
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from torch import Tensor, nn

from ..checkpoints import (Loaded, detect_layout, format_keys, load, load_state_dict_strict, save_model,
                           write_safetensors)
from ..checkpoints.layouts import strip_wrappers
from ..checkpoints.torch_file import unwrap_state
from ..model import FCMAE
from ..config.model import MODEL_SIZES, FCMAEConfig, total_stride
from .key_rules import to_fcmae_names
from .shapes import csv, decoder_shape, infer_decoder, infer_encoder, infer_in_chans, model_name, settings_hints

__all__ = ["TARGETS", "Conversion", "convert", "to_timm", "to_fcmae", "save_conversion", "load_checkpoint"]

log = logging.getLogger(__name__)

TARGETS = ("timm", "fcmae")
SEED = 0  # a fresh decoder is drawn from this seed, so a conversion gives the same file every time

StateDict = dict[str, Tensor]
Source = str | os.PathLike | Mapping[str, Any]


def load_checkpoint(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """(weights, metadata) of anything `fcmae.checkpoints.load` reads; ValueError (one line) for anything else."""
    loaded = load(path)
    return loaded.state, loaded.metadata


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
    loaded:   what `fcmae.checkpoints.load` found at `source` (file, kind, metadata, run config, step), without its
              weights (they are `state`, converted); None for a state-dict input. The exports describe the input
              from it rather than reading the file again.
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
    loaded: Loaded | None = None

    @property
    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments beyond the name that `timm.create_model` needs for these weights."""
        kwargs: dict[str, Any] = {}
        if self.name not in MODEL_SIZES or list(MODEL_SIZES[self.name][0]) != self.config["depths"] or \
                list(MODEL_SIZES[self.name][1]) != self.config["dims"]:
            kwargs.update(depths=tuple(self.config["depths"]), dims=tuple(self.config["dims"]))
        if self.config.get("in_chans", 3) != 3:
            kwargs["in_chans"] = self.config["in_chans"]
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
    loaded: Loaded | None = None
    if isinstance(source, Mapping):
        state, metadata = unwrap_state(source, "the state dict")
        state, where, recorded = strip_wrappers(state), "<state dict>", None
        try:
            layout = detect_layout(state)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    else:
        loaded = load(source)
        state, metadata, layout, where = loaded.state, loaded.metadata, loaded.layout, str(source)
        recorded = loaded.model_config  # a model file's config, or a pretraining checkpoint's run config
        recorded = recorded.to_dict() if recorded is not None else None
    state, origin = to_fcmae_names(state, layout, where)

    depths, dims = infer_encoder(state, where)
    hints = recorded if recorded is not None else settings_hints(metadata)
    name = model_name(model, depths, dims, hints, where)
    found_decoder = infer_decoder(state, where)
    head = sorted(k for k in state if k.startswith("head."))
    unknown = sorted(k for k in state if not k.startswith(("encoder.", "decoder.", "head.")))
    if unknown:
        raise ValueError(f"{where} does not fit {name}: unexpected {format_keys([origin[k] for k in unknown])}")

    depth, width = decoder_shape(found_decoder, decoder_depth, decoder_embed_dim, where)
    settings = {k: hints[k] for k in ("img_size", "mask_ratio", "norm_pix_loss", "drop_path_rate", "backend")
                if k in hints}
    in_chans = infer_in_chans(state)
    config = dict(name=name, depths=list(depths), dims=list(dims), patch_size=total_stride(depths),
                  in_chans=in_chans, decoder_depth=depth, decoder_embed_dim=width, **settings)
    channels = f", {in_chans} input channels" if in_chans != 3 else ""
    notes = [f"detected {layout} layout in {where}: {name} (depths {csv(depths)}, dims {csv(dims)}{channels}), "
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
    if loaded is not None:
        result.loaded = replace(loaded, state={})  # what it was; the weights are result.state (no second copy)
    for note in notes:
        log.info(note)
    return result



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
    timm_model = _timm_model(config["name"], config["depths"], config["dims"], conv_mlp, num_classes,
                             config["in_chans"])
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
                num_classes: int, in_chans: int = 3) -> nn.Module:
    """timm's ConvNeXt V2 of this size on the meta device; conv_mlp None keeps timm's default for the name."""
    kwargs: dict[str, Any] = dict(depths=tuple(depths), dims=tuple(dims), num_classes=num_classes,
                                  in_chans=in_chans)
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
                "timm_kwargs": json.dumps(result.timm_kwargs), "depths": csv(result.config["depths"]),
                "dims": csv(result.config["dims"]), "conv_mlp": str(result.conv_mlp).lower(), **provenance}
    write_safetensors(result.state, path, metadata)


