"""Gradients that come back in their parameter's strides, the layout DDP's gradient buckets are built with.

pretrain.py stores conv weights channels-last, the layout their gradients take when a native conv computes them.
A depthwise (C, 1, kh, kw) or a 1x1 (O, I, 1, 1) weight has the same memory either way, and differs only in the
strides of its size-1 dims. Where such a weight is used through views (flatten, t) rather than a conv, its
gradient comes back with the contiguous strides. Autograd accepts it, since it ignores the strides of size-1
dims, but DDP compares every stride with its bucket view and warns on every multi-GPU run that the mismatch "may
impair performance". `in_param_strides(weight)` marks such a use.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["in_param_strides"]


class _InParamStrides(torch.autograd.Function):
    """Identity forward; the backward returns the gradient with the input's strides (a copy only when they
    differ, of a weight-sized tensor)."""

    @staticmethod
    def forward(ctx, param: Tensor) -> Tensor:
        ctx.size, ctx.stride = param.size(), param.stride()
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if grad.stride() == ctx.stride:
            return grad
        return torch.empty_strided(ctx.size, ctx.stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def in_param_strides(param: Tensor) -> Tensor:
    """`param`, whose gradient arrives in `param.stride()`. A no-op when no gradient is needed."""
    return _InParamStrides.apply(param) if param.requires_grad and torch.is_grad_enabled() else param
