"""Crop and resize a batch of different-size images to one size with a few batched matrix products.

`F.interpolate(..., mode="bicubic", antialias=True)` needs one call per image when the crops differ in size, which
is one to three kernel launches per image: for a batch of 256 on a GPU, more launches than a small model's
training step. An antialiased bicubic resize is separable: output = Wy @ crop @ Wx^T, with Wy (H_out, h) and
Wx (W_out, w) the filter's weights. This module builds every image's Wy and Wx at once, with the same formula as
PyTorch's antialiased kernel (and PIL's: Keys' cubic with a = -0.5, support widened by the scale when
shrinking, weights normalized per output pixel), pads the crops into one batch (zero rows and columns get zero
weight), and runs two batched matmuls in float64, so that TF32 settings cannot change the result.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["resize_weights", "crop_resize"]

CUBIC_A = -0.5  # PIL's and PyTorch's antialiased bicubic (the plain bicubic mode uses -0.75)
CHUNK_BYTES = 512 << 20  # the padded float64 crops of one chunk: images are resized in chunks below this


def _cubic(x: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with a = CUBIC_A, support [-2, 2]."""
    x = x.abs()
    a = CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(lengths: Tensor, out_size: int, max_length: int) -> Tensor:
    """The antialiased bicubic weights that resize each of N signals of length `lengths[n]` to `out_size`.

    Args:
        lengths: (N,) int64 input lengths (crop heights or widths), each <= max_length.
        out_size: output length.
        max_length: the padded input length.
    Returns:
        (N, out_size, max_length) float64; row i of sample n holds the weight of each input position for output
        position i (zero beyond lengths[n]), as `_compute_weights_aa` in PyTorch's UpSampleKernel.cpp sets them.
    """
    scale = (lengths.double() / out_size)[:, None, None]  # (N, 1, 1): input pixels per output pixel
    support = torch.where(scale >= 1, 2 * scale, torch.full_like(scale, 2.0))  # bicubic's 4 taps / 2, widened
    invscale = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(out_size, device=lengths.device, dtype=torch.float64)[None, :, None] + 0.5)
    position = torch.arange(max_length, device=lengths.device, dtype=torch.float64)[None, None, :]
    first = (center - support + 0.5).trunc().clamp(min=0)  # C++'s static_cast<int64_t>: toward zero
    end = torch.minimum((center + support + 0.5).trunc(), lengths.double()[:, None, None])
    weights = _cubic((position - center + 0.5) * invscale)
    weights = torch.where((position >= first) & (position < end), weights, torch.zeros_like(weights))
    total = weights.sum(-1, keepdim=True)
    return weights / torch.where(total == 0, torch.ones_like(total), total)


def crop_resize(images: Sequence[Tensor], boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop each image to its box and resize it to `size` (antialiased bicubic), in batched matmuls.

    Args:
        images: N tensors (C, H_n, W_n), any dtype, on one device; sizes may differ.
        boxes: (N, 4) int (top, left, h, w) per image, on the host.
        size: (H_out, W_out).
    Returns:
        (N, C, H_out, W_out) float32, unrounded: `F.interpolate(crop[None].float(), size, mode="bicubic",
        antialias=True)[0]` per image, to float rounding.
    """
    device = images[0].device
    channels = images[0].shape[0]
    out = torch.empty(len(images), channels, *size, device=device)
    heights, widths = boxes[:, 2], boxes[:, 3]
    for chunk in _chunks(heights.tolist(), widths.tolist(), channels):
        rows, cols = int(heights[chunk].max()), int(widths[chunk].max())
        padded = torch.zeros(len(chunk), channels, rows, cols, device=device, dtype=images[0].dtype)
        for slot, n in enumerate(chunk):  # one copy per image: the only per-image launch
            top, left, h, w = boxes[n].tolist()
            padded[slot, :, :h, :w] = images[n][:, top:top + h, left:left + w]
        # One small copy to the device per chunk: the crops' heights and widths and where they go in the batch
        heights_d, widths_d, slots = _to_device([heights[chunk].tolist(), widths[chunk].tolist(), chunk], device)
        wy = resize_weights(heights_d, size[0], rows)  # (n, H_out, rows)
        wx = resize_weights(widths_d, size[1], cols)  # (n, W_out, cols)
        resized = wy[:, None] @ padded.double() @ wx[:, None].transpose(-1, -2)  # (n, C, H_out, W_out)
        out.index_copy_(0, slots, resized.float())
    return out


def _chunks(heights: list[int], widths: list[int], channels: int) -> list[list[int]]:
    """Image indices in groups whose padded float64 crops stay below CHUNK_BYTES (a group holds at least one
    image); largest crops first, so that a group's crops are of similar size and little of it is padding."""
    order = sorted(range(len(heights)), key=lambda n: heights[n] * widths[n], reverse=True)
    chunks: list[list[int]] = []
    rows = cols = 0
    for n in order:
        grown_rows, grown_cols = max(rows, heights[n]), max(cols, widths[n])
        if chunks and (len(chunks[-1]) + 1) * channels * grown_rows * grown_cols * 8 <= CHUNK_BYTES:
            chunks[-1].append(n)
            rows, cols = grown_rows, grown_cols
        else:
            chunks.append([n])
            rows, cols = heights[n], widths[n]
    return chunks


def _to_device(rows: list[list[int]], device: torch.device) -> Tensor:
    """(R, K) int64 on `device`. On CUDA from pinned memory, non-blocking: a copy from pageable memory would
    wait for the stream, i.e. for the training step this batch is prepared beside."""
    values = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)
