"""Which key layout a state dict is in, from its key names alone.

  "fcmae"           this project's FCMAE state dict: `encoder.*` with timm's names and a Linear MLP, `decoder.*`.
  "timm"            `timm.create_model('convnextv2_*')` weights: `stem.*`, `stages.*`, optional `head.*`.
  "official-me"     the official main_pretrain.py's MinkowskiEngine encoder (`.kernel`, `.ln.`, `.linear.` keys)
                    and its dense decoder.
  "official-dense"  the released dense checkpoints (`downsample_layers.*`, `stages.S.B.*`), with or without the
                    `encoder.` prefix, a decoder and a classifier.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from timm.models import clean_state_dict
from torch import Tensor

__all__ = ["LAYOUTS", "detect_layout", "strip_wrappers"]

LAYOUTS = ("fcmae", "timm", "official-me", "official-dense")

_SIGNATURES = {  # a key that only this layout has
    "fcmae": re.compile(r"encoder\.(stem|stages\.\d+\.(blocks|downsample))\."),
    "timm": re.compile(r"(stem|stages\.\d+\.(blocks|downsample))\."),
    "official": re.compile(r"(encoder\.)?(downsample_layers\.\d+|stages\.\d+\.\d+)\."),
}
_ME_SIGNATURE = re.compile(r"\.(kernel|ln\.(weight|bias)|linear\.(weight|bias))$")


def detect_layout(state: Mapping[str, Any]) -> str:
    """Which of LAYOUTS a state dict is in. Raises ValueError if no key looks like a ConvNeXt V2 encoder key."""
    for layout in ("fcmae", "timm", "official"):
        if any(_SIGNATURES[layout].match(k) for k in state):
            if layout == "official":
                return "official-me" if any(_ME_SIGNATURE.search(k) for k in state) else "official-dense"
            return layout
    raise ValueError(f"no ConvNeXt V2 encoder weights found (keys: {', '.join(list(state)[:6])} ...)")


def strip_wrappers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the `module.` / `_orig_mod.` prefixes that DDP and torch.compile put on keys (timm's rule)."""
    return clean_state_dict(dict(state))
