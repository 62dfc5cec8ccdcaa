"""Batches to the training device: pixels travel as uint8 and are normalized there, one step ahead of the step.

`PretrainTransform(normalize=False)` leaves 8-bit photos as uint8 (a quarter of float32's bytes through pinned
memory and PCIe) and arrays as float32 in [0, 1]; `collate_pixels` batches them and `DevicePixels` normalizes
on the device, with the same operations in the same order as the transform would have on the host, so the
values are the same to the bit.

`DeviceFeed` moves each batch (or augments it, with --gpu-augment) on a side CUDA stream while the previous step
runs, so that neither the copy nor the augmentation waits in line on the compute stream. On a CPU it just calls
the transfer.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import default_collate

__all__ = ["collate_pixels", "DevicePixels", "DeviceFeed"]


def collate_pixels(items: list[dict]) -> dict:
    """default_collate, but a batch that mixes uint8 photos with float arrays gets float32 in [0, 1]."""
    images = [item["image"] for item in items]
    if len({image.dtype for image in images}) > 1:
        items = [{**item, "image": _unit_float(item["image"])} for item in items]
    return default_collate(items)


def _unit_float(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float().div_(255) if pixels.dtype == torch.uint8 else pixels


class DevicePixels:
    """(N, C, H, W) uint8 (0-255) or float ([0, 1]) pixels -> normalized float32 on `device`, channels-last.

    The copy does not block the host (the loader's batches are in pinned memory on a GPU machine); mean and std
    are copied to the device once."""

    def __init__(self, device: torch.device | str, mean: Sequence[float], std: Sequence[float]):
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, non_blocking=True)
        images = _unit_float(pixels) if pixels.dtype == torch.uint8 else pixels.clone()
        return images.sub_(self.mean).div_(self.std).contiguous(memory_format=torch.channels_last)


class DeviceFeed:
    """Wraps an iterable of host batches; yields `transfer(batch)`, computed one batch ahead on a side stream.

    transfer(batch) -> batch on the device (copies, or --gpu-augment's decode and augmentation). Entries it
    leaves on the host (e.g. the "unreadable" list) pass through. On CUDA the next batch's transfer is issued
    on a side stream before the current batch is handed out, so that it overlaps the current step; the compute
    stream waits for it before using it, and its tensors are marked as used there so that the caching allocator
    does not hand their memory back to the side stream too early.
    """

    def __init__(self, transfer: Callable[[Any], Any], device: torch.device | str):
        self.transfer, self.device = transfer, torch.device(device)

    def __call__(self, batches: Iterable[Any]) -> Iterator[Any]:
        if self.device.type != "cuda":
            yield from map(self.transfer, batches)
            return
        stream = torch.cuda.Stream(self.device)
        ahead = None
        for batch in batches:
            staged = self._staged(batch, stream)
            if ahead is not None:
                yield self._ready(ahead, stream)
            ahead = staged
        if ahead is not None:
            yield self._ready(ahead, stream)

    def _staged(self, batch: Any, stream: torch.cuda.Stream) -> Any:
        stream.wait_stream(torch.cuda.current_stream(self.device))  # e.g. buffers freed by the step before
        with torch.cuda.stream(stream):
            return self.transfer(batch)

    def _ready(self, batch: Any, stream: torch.cuda.Stream) -> Any:
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(stream)
        for tensor in _tensors(batch):
            if tensor.is_cuda:
                tensor.record_stream(current)
        return batch


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
