"""Linear probing (the MAE protocol): a frozen encoder, then BatchNorm without affine and a linear classifier.

The probe reads timm's pre-logits: the globally pooled features after the head's LayerNorm, which stays frozen
(fresh from an FCMAE checkpoint: unit weight, zero bias). For saving, the BatchNorm folds into the linear layer,
so the probe becomes an ordinary timm model that `timm.create_model(name, num_classes=K)` loads strictly and
that computes exactly what the probe computed.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["attach_probe", "fold_probe"]


def attach_probe(model: nn.Module) -> nn.Module:
    """Freeze a timm ConvNeXt and replace head.fc by BatchNorm1d(affine=False) + Linear, the only trained part."""
    for param in model.parameters():
        param.requires_grad_(False)
    fc = model.head.fc
    nn.init.trunc_normal_(fc.weight, std=0.01)  # MAE's probe head init
    nn.init.zeros_(fc.bias)
    model.head.fc = nn.Sequential(nn.BatchNorm1d(fc.in_features, affine=False, eps=1e-6), fc)
    fc.weight.requires_grad_(True)
    fc.bias.requires_grad_(True)
    return model


def fold_probe(state_dict: dict[str, torch.Tensor], eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """A probe's state dict -> timm layout: head.fc = Linear(BatchNorm(x)) with the running statistics folded in."""
    state = {k: v for k, v in state_dict.items() if not k.startswith("head.fc.")}
    mean, var = state_dict["head.fc.0.running_mean"], state_dict["head.fc.0.running_var"]
    weight, bias = state_dict["head.fc.1.weight"], state_dict["head.fc.1.bias"]
    scale = (var + eps).rsqrt()
    state["head.fc.weight"] = weight * scale
    state["head.fc.bias"] = bias - (weight * scale) @ mean
    return state
