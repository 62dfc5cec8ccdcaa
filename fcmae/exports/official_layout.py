"""The official ConvNeXt V2 layouts, as the released `convnextv2_*` files and the official code name them:
`downsample_layers.{0..3}.{0,1}.*`, `stages.{s}.{b}.{dwconv,norm,pwconv1,grn.gamma,grn.beta,pwconv2}.*`, and with a
classifier `norm.*` and `head.*`. The two kinds of released file differ in one shape, and the official code reads
each by its own path:

  pretrained (no classifier)  GRN gamma/beta (1, 4C), as in the released `convnextv2_*_fcmae.pt` files (the sparse
                              encoder's shape). The official `main_finetune.py --finetune FILE` reads these: it
                              drops decoder keys, then `utils.remap_checkpoint_keys` unsqueezes every GRN tensor
                              twice, to the dense model's (1, 1, 1, 4C), and `utils.load_state_dict` loads the rest
                              (it reports mismatches without stopping: a (1, 1, 1, 4C) GRN there would end as a
                              (1, 1, 1, 1, 1, 4C) size mismatch and a GRN left at zero).
  fine-tuned (a classifier)   GRN (1, 1, 1, 4C), the dense model's own shape, as in the released fine-tuned files;
                              `main_finetune.py --resume FILE` (and `--eval true`) load them strictly.

The detection and segmentation backbones of ConvNeXt (V1; mmdetection / mmsegmentation `ConvNeXt`, the detectron2
port) read the same names through `load_checkpoint(..., strict=False)` of `checkpoint['model']`. Those V1 blocks have
no GRN and do have layer scale (`gamma`), so they load V2 weights only after their Block gains the V2 GRN and loses
layer scale (layer_scale_init_value=0); a dense GRN there is (1, 1, 1, 4C), so a pretrained file's GRN needs the
official remap's reshape first. With strict=False an unchanged backbone skips `grn.*` without a word.

The `.pth` output is `torch.save({'model': state_dict})`, the official files' wrapping; `.safetensors` holds the
bare state dict (which the official scripts, reading `torch.load(FILE)['model']`, cannot open). `fcmae.convert`
reads both back.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ..convert import KEY_TABLE, Conversion, template_regex
from ..checkpoints import write_safetensors
from ..checkpoints.output import write_file_atomically

__all__ = ["OFFICIAL_SUFFIXES", "describe_official", "is_classifier", "to_official_names", "write_official"]

OFFICIAL_SUFFIXES = (".pth", ".pt", ".safetensors")

# Our encoder/head names (timm's, with `encoder.` on the encoder) -> the official dense names; the decoder rules of
# KEY_TABLE are left out: detection and fine-tuning read the encoder only.
_RULES = [(template_regex(rule.ours), rule.official, rule.kind) for rule in KEY_TABLE
          if not rule.ours.startswith("decoder.")]


def is_classifier(timm_state: dict[str, Tensor]) -> bool:
    """Whether these weights have a classifier (`head.fc`): they are written in the fine-tuned layout."""
    return "head.fc.weight" in timm_state


def to_official_names(timm_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ConvNeXt V2 weights with Linear MLPs (`convert(..., "timm", conv_mlp=False).state`) -> the official
    layout without the `encoder.` prefix: GRN (1, 1, 1, 4C) with a classifier, (1, 4C) without (see the module
    docstring). Raises ValueError for a key no rule knows."""
    grn_shape = (1, 1, 1, -1) if is_classifier(timm_state) else (1, -1)
    out, unknown = {}, []
    for key, value in timm_state.items():
        ours = key if key.startswith("head.") else "encoder." + key
        match = next(((m, official, kind) for rx, official, kind in _RULES if (m := rx.fullmatch(ours))), None)
        if match is None:
            unknown.append(key)
            continue
        m, official, kind = match
        if kind == "row":  # GRN: (4C,) -> (1, 4C) or (1, 1, 1, 4C)
            value = value.reshape(grn_shape)
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
                                        "source": Path(conversion.source).name, "layout": conversion.layout})
        return len(state)
    write_file_atomically(path, lambda tmp: torch.save({"model": state}, tmp))
    return len(state)


def describe_official(conversion: Conversion, path: str | os.PathLike) -> list[str]:
    """What `fcmae-convert --to official` prints about the file it wrote at `path`: what it holds, and what reads it."""
    path = Path(path)
    if is_classifier(conversion.state):
        layout = ("the official fine-tuned layout (downsample_layers.*, stages.*, norm.*, head.*; GRN "
                  "(1, 1, 1, 4C)), as the released fine-tuned convnextv2_* files")
        reader = f"the official main_finetune.py --eval true --resume {path} (a strict load)"
    else:
        layout = ("the layout of the released convnextv2_*_fcmae.pt files (downsample_layers.*, stages.*, no "
                  "decoder; GRN (1, 4C))")
        reader = f"the official main_finetune.py --finetune {path} (its remap reshapes GRN to (1, 1, 1, 4C))"
    if path.suffix == ".safetensors":
        return [f"{path} holds a bare state dict in {layout}",
                f"use: safetensors.torch.load_file({str(path)!r}); the official scripts read torch.load(FILE)"
                f"['model'] of a .pth: write {path.with_suffix('.pth').name} for {reader.split(' --')[0]}"]
    return [f"{path} holds {{'model': state_dict}} in {layout}", f"use: {reader}"]
