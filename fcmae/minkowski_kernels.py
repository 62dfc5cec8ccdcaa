"""MinkowskiEngine <-> dense kernel layouts.

An ME kernel holds one (C_in, C_out) matrix per kernel offset; offset n sits at row n % k, column n // k of the
dense k x k window (the first spatial coordinate runs fastest), hence the final transpose of the last two dims.
ME biases and GRN parameters are rows (1, C); the official dense GRN parameters are (1, 1, 1, C).
"""

from __future__ import annotations

import math
from typing import Callable

from torch import Tensor

__all__ = ["me_conv_to_dense", "dense_conv_to_me", "me_depthwise_to_dense", "dense_depthwise_to_me",
           "row_to_vector", "CONVERSIONS"]

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



def row_to_vector(row: Tensor) -> Tensor:
    """(1, C) ME biases and GRN parameters, (1, 1, 1, C) dense GRN parameters -> (C,)."""
    if row.ndim == 0 or any(size != 1 for size in row.shape[:-1]):
        raise ValueError("expected a row of shape (1, C) or (1, 1, 1, C)")
    return row.reshape(row.shape[-1])


# How an official tensor becomes ours; `KeyRule.kind` names one of these.
CONVERSIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "conv": me_conv_to_dense, "dwconv": me_depthwise_to_dense, "row": row_to_vector,
}

