"""Shape inference: the encoder's depths and dims, the decoder's depth and width, and the model name, read off
an "fcmae"-layout state dict (and the settings a file records)."""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

from torch import Tensor

from ..config.model import CUSTOM, MODEL_SIZES, resolve_name

__all__ = ["CUSTOM", "infer_encoder", "infer_decoder", "model_name", "settings_hints", "decoder_shape", "csv"]

StateDict = dict[str, Tensor]


def infer_encoder(state: StateDict, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
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


def infer_in_chans(state: StateDict) -> int:
    """The input channels of an "fcmae"-layout encoder: its stem conv's (C_out, C_in, 4, 4) weight; 3 without one."""
    stem = state.get("encoder.stem.0.weight")
    return int(stem.shape[1]) if stem is not None and stem.ndim == 4 else 3


def infer_decoder(state: StateDict, where: str) -> tuple[int, int] | None:
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


def model_name(model: str | None, depths: tuple[int, ...], dims: tuple[int, ...], hints: dict[str, Any],
                source: str) -> str:
    """The model name: `model` if given (it must fit), else the one an fcmae file records for these shapes, else
    the named size with these depths and dims, else CUSTOM."""
    match = _named_size(depths, dims)
    if model is not None:
        name = resolve_name(model)
        if (tuple(MODEL_SIZES[name][0]), tuple(MODEL_SIZES[name][1])) != (depths, dims):
            hint = f"it is a {match}" if match else "a custom size: leave the model name out"
            raise ValueError(f"model {name} does not fit {source}: its encoder has depths {csv(depths)} and dims "
                             f"{csv(dims)}, {name} has depths {csv(MODEL_SIZES[name][0])} and dims "
                             f"{csv(MODEL_SIZES[name][1])} ({hint})")
        return name
    if hints.get("name") and hints.get("depths") == list(depths) and hints.get("dims") == list(dims):
        return hints["name"]
    return match or CUSTOM


def settings_hints(metadata: Mapping[str, str]) -> dict[str, Any]:
    """FCMAE settings the input records: the config of an fcmae file, or an official checkpoint's args."""
    if metadata.get("format") == "fcmae" and "config" in metadata:
        return json.loads(metadata["config"])
    if "args" in metadata:
        args = json.loads(metadata["args"])
        renames = {"input_size": "img_size", "mask_ratio": "mask_ratio", "norm_pix_loss": "norm_pix_loss"}
        return {ours: args[theirs] for theirs, ours in renames.items() if args.get(theirs) is not None}
    return {}


def csv(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


def decoder_shape(found: tuple[int, int] | None, depth: int | None, width: int | None, where: str) -> tuple[int, int]:
    """(depth, width) of the decoder: the input's, which the requested values must match, or the requested ones."""
    if found is None:
        return (1 if depth is None else depth), (512 if width is None else width)
    if (depth is not None and depth != found[0]) or (width is not None and width != found[1]):
        asked = " and ".join(f"{name} {value}" for name, value in (("depth", depth), ("width", width)) if value)
        raise ValueError(f"{where} has a decoder of depth {found[0]} and width {found[1]}, not the requested "
                         f"{asked}: set --decoder-depth {found[0]} --decoder-embed-dim {found[1]} "
                         "(the requested sizes only shape a fresh decoder, for inputs without one)")
    return found

