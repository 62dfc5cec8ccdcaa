"""Layer-wise lr decay for fine-tuning ConvNeXt V2, with the official release's layer ids.

timm's own layer decay gives every downsample layer an id of its own; the official recipes were tuned with
these ids instead (written here for timm's parameter names):

  "single": stem and stage s's downsample share the id of the stage's first block, sum(depths[:s]) + 1;
            block b of stage s: sum(depths[:s]) + b + 1; everything after the last stage (head): sum(depths) + 1.
  "group":  12 ids for 3-3-27-3 models: stem 0; stage 0 blocks 1; stage 1 (and its downsample) 2; stage 2's
            downsample 3 and its blocks 3 + b // 3; stage 3 (and its downsample) 12; head 13.

The lr of id i is lr * decay ** (num_layers + 1 - i), with num_layers = sum(depths) ("single") or 12
("group"), so the head trains at the full lr. Biases and other 1-D parameters (norms, GRN) get no weight decay.
"""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn

__all__ = ["layer_id", "param_groups_layer_decay"]

GROUP_LAYERS = 12


def layer_id(name: str, depths: Sequence[int], kind: str = "single") -> int:
    """The official layer id of a timm ConvNeXt parameter name."""
    stem = name.startswith("stem.")
    down = re.match(r"stages\.(\d+)\.downsample\.", name)
    block = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", name)
    if kind == "single":
        if stem:
            return 1
        if down:
            return sum(depths[: int(down[1])]) + 1
        if block:
            return sum(depths[: int(block[1])]) + int(block[2]) + 1
        return sum(depths) + 1
    if stem:
        return 0
    if not (down or block):
        return GROUP_LAYERS + 1
    stage = int((down or block)[1])
    if stage == 3:
        return GROUP_LAYERS
    if stage == 2 and block:
        return 3 + int(block[2]) // 3
    return stage + 1


def param_groups_layer_decay(
    model: nn.Module, depths: Sequence[int], weight_decay: float, layer_decay: float, kind: str = "single"
) -> list[dict]:
    """Optimizer parameter groups with an `lr_scale` per layer id (timm's schedulers apply it)."""
    num_layers = sum(depths) if kind == "single" else GROUP_LAYERS
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        index = layer_id(name, depths, kind)
        decay = param.ndim > 1 and not name.endswith(".bias")
        group = groups.setdefault((index, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (num_layers + 1 - index), "layer_id": index,
        })  # fmt: skip
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]
