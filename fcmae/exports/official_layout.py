"""The official ConvNeXt V2 dense layout, as the released `convnextv2_*` files and the official code name it:
`downsample_layers.{0..3}.{0,1}.*`, `stages.{s}.{b}.{dwconv,norm,pwconv1,grn.gamma,grn.beta,pwconv2}.*` (GRN
(1, 1, 1, 4C)), and with a classifier `norm.*` and `head.*`.

These are also the names the ConvNeXt (V1) detection and segmentation backbones read (mmdetection / mmsegmentation
`ConvNeXt`, the detectron2 port) through `load_checkpoint(..., strict=False)` of `checkpoint['model']`. Those V1
blocks have no GRN and do have layer scale (`gamma`), so they load V2 weights only after their Block gains the V2
GRN and loses layer scale (layer_scale_init_value=0): with strict=False an unchanged V1 backbone would skip
`grn.*` without a word. The per-stage output norms `norm0`..`norm3` of those backbones are fresh either way.

The `.pth` output is `torch.save({'model': state_dict})`, the official files' wrapping; `.safetensors` holds the
bare state dict. `fcmae.convert` reads both back.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ..convert import KEY_TABLE, Conversion, template_regex
from ..checkpoints import write_safetensors

__all__ = ["OFFICIAL_SUFFIXES", "to_official_names", "write_official"]

OFFICIAL_SUFFIXES = (".pth", ".pt", ".safetensors")

# Our encoder/head names (timm's, with `encoder.` on the encoder) -> the official dense names; the decoder rules of
# KEY_TABLE are left out: detection and fine-tuning read the encoder only.
_RULES = [(template_regex(rule.ours), rule.official, rule.kind) for rule in KEY_TABLE
          if not rule.ours.startswith("decoder.")]


def to_official_names(timm_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ConvNeXt V2 weights with Linear MLPs (`convert(..., "timm", conv_mlp=False).state`) -> the official
    dense layout without the `encoder.` prefix. Raises ValueError for a key no rule knows."""
    out, unknown = {}, []
    for key, value in timm_state.items():
        ours = key if key.startswith("head.") else "encoder." + key
        match = next(((m, official, kind) for rx, official, kind in _RULES if (m := rx.fullmatch(ours))), None)
        if match is None:
            unknown.append(key)
            continue
        m, official, kind = match
        if kind == "row":  # GRN: (4C,) -> (1, 1, 1, 4C)
            value = value.reshape(1, 1, 1, -1)
        out[official.format(**m.groupdict()).removeprefix("encoder.")] = value
    if unknown:
        raise ValueError(f"no official name for {', '.join(unknown[:8])}")
    return out


def write_official(conversion: Conversion, path: str | os.PathLike) -> int:
    """Write the official-layout weights of a Linear-MLP timm conversion to `path` (.pth/.pt: {'model': ...};
    .safetensors: bare), atomically. Returns the number of tensors."""
    path = Path(path)
    state = {k: v.contiguous() for k, v in to_official_names(conversion.state).items()}
    if path.suffix == ".safetensors":
        write_safetensors(state, path, {"format": "official-dense", "model": conversion.name,
                                        "source": conversion.source, "layout": conversion.layout})
        return len(state)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no such folder for {path.name}: {path.parent}")
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save({"model": state}, tmp)
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"could not write {path}: {str(e).strip().splitlines()[0]}") from None
    return len(state)
