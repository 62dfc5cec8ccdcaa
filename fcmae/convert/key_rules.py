"""Key rules: how each parameter is named in the official layouts and in ours, and renaming a state dict to ours.

One table serves both directions: reading official checkpoints (`to_fcmae_names`) and writing the official dense
layout (`fcmae.exports.official_layout`). timm's `convnext.checkpoint_filter_fn` renames the official dense encoder
the same way (tests/test_convert.py checks that), but it knows neither the MinkowskiEngine layout, nor the decoder,
nor the way back, and it renames keys it does not know instead of reporting them; hence our own table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from ..checkpoints import format_keys
from ..minkowski_kernels import CONVERSIONS

__all__ = ["KeyRule", "KEY_TABLE", "template_regex", "to_fcmae_names"]

StateDict = dict[str, Tensor]

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


def template_regex(template: str) -> re.Pattern[str]:
    """'a.{s}.{w}' -> a regex whose named groups fill the same placeholders of another template."""
    parts = re.split(r"\{(\w)\}", template)  # literal text at even indices, placeholder names at odd ones
    return re.compile("".join(re.escape(p) if i % 2 == 0 else _FIELDS[p] for i, p in enumerate(parts)))



# Per official layout: (regex of the official name, our name template, conversion or None).
_RULES: dict[str, list[tuple[re.Pattern[str], str, str | None]]] = {
    "official-dense": [(template_regex(r.official), r.ours, r.kind) for r in KEY_TABLE],
    "official-me": [(template_regex(r.me or r.official), r.ours, r.me_kind or r.kind) for r in KEY_TABLE],
}


def to_fcmae_names(state: StateDict, layout: str, where: str) -> tuple[StateDict, dict[str, str]]:
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
                    value = CONVERSIONS[kind](value)
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

