"""`--gpu-augment`: JPEGs decoded by nvjpeg and cropped, resized, flipped and normalized on the device, in batches.

The data-loader workers only read the file, parse its header and draw the crop and flip, from the same per-sample
generator as `PretrainTransform` (the same crop boxes and flips as the CPU path). The batch then goes to the device
as encoded bytes: `torchvision.io.decode_jpeg(list, device=...)` decodes the whole batch at once (nvjpeg on CUDA,
libjpeg on the CPU, so the same code runs and is tested on both), and the batch is cropped and resized with
torch's antialiased bicubic filter (in batched matmuls: `batched_resize.crop_resize`), rounded to 8 bits like PIL's
output, flipped and normalized.

Files that are not plain JPEGs (PNG, CMYK JPEGs, EXIF-rotated JPEGs) are decoded and rotated by PIL in the worker
and travel as pixels; only their crop runs on the device. 16-bit files and arrays travel as 8-bit RGB pixels (this
path is for photos; N-channel data uses the CPU path).

In pretrain.py (`--gpu-augment`) the loader's batches stay on the host (nvjpeg reads the encoded bytes from host
memory) and a `DeviceAugment` runs them on DeviceFeed's side stream, one step ahead, on the training device.

Differences from the CPU path: the resize runs on float pixels rather than 8-bit ones (the same antialiased bicubic
filter), the draft decode is not used, and nvjpeg's IDCT is not libjpeg-turbo's, so pixels differ by a few 8-bit
levels (measured in tests/test_data.py); the crops and flips are the same.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .batched_resize import crop_resize
from .decoding import is_plain_jpeg, to_rgb
from .transforms import crop_params, match_channels, sample_generator


class EncodedCrop:
    """The worker's half: an opened image -> {"data": JPEG bytes (1-D uint8) or RGB pixels (3, H, W) uint8,
    "crop": (top, left, h, w), "flip": bool}. Use with `collate_encoded` and `DeviceAugment`."""

    decodes = True
    in_chans = 3

    def __init__(self, scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.scale, self.ratio = scale, ratio

    def __call__(self, img: Image.Image | np.ndarray, entropy: Sequence[int]) -> dict:
        generator = sample_generator(entropy)
        if isinstance(img, np.ndarray):  # (H, W, C) floats in [0, 1] (16-bit PNG / TIFF, .npy): as 8-bit RGB pixels
            pixels = np.clip(match_channels(img, self.in_chans) * 255 + 0.5, 0, 255).astype(np.uint8)
            data = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
            height, width = pixels.shape[:2]
        elif is_plain_jpeg(img):
            width, height = img.size
            img.fp.seek(0)
            data = torch.frombuffer(bytearray(img.fp.read()), dtype=torch.uint8)
        else:
            img = to_rgb(img)
            width, height = img.size
            data = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
        top, left, h, w = crop_params(height, width, self.scale, self.ratio, generator)
        flip = torch.rand(1, generator=generator).item() < 0.5
        return {"data": data, "crop": torch.tensor([top, left, h, w]), "flip": flip}


def collate_encoded(items: list[dict]) -> dict:
    """DataLoader collate_fn for datasets whose transform is `EncodedCrop`: images stay a list (their sizes
    differ); crops, flips and the other fields are stacked."""
    images = [item["image"] for item in items]
    return {
        "image": {"data": [image["data"] for image in images], "crop": torch.stack([i["crop"] for i in images]),
                  "flip": torch.tensor([i["flip"] for i in images])},
        **{key: torch.tensor([item[key] for item in items]) for key in ("label", "skipped", "readable")},
    }


class DeviceAugment:
    """Decode, crop-resize (bicubic, antialiased), flip and normalize a collated batch on `device`:
    `collate_encoded`'s batch -> (N, 3, H, W) float32, channels-last.

    No step waits on the host: the loader's tensors are pinned (non-blocking copies), the mean, std and the resize's
    index arrays reach the device from pinned memory, and the resize of the whole batch is a few batched matmuls
    (`crop_resize`), so a batch costs about one launch per image (its crop's copy) plus a fixed few, and can run on
    DeviceFeed's side stream while the step before it trains.
    """

    def __init__(self, device: torch.device | str, size: tuple[int, int],
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD):
        self.device, self.size = torch.device(device), size
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) * 255

    def __call__(self, encoded: dict) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        data = encoded["data"]
        jpegs = [i for i, d in enumerate(data) if d.dim() == 1]
        pixels = [d.to(self.device, non_blocking=True) if d.dim() == 3 else None for d in data]
        if jpegs:
            decoded = decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB, device=self.device)
            for i, image in zip(jpegs, decoded):
                pixels[i] = image
        out = crop_resize(pixels, encoded["crop"], self.size)
        out = out.clamp_(0, 255).round_()  # PIL's resize output is 8-bit: the CPU path's values
        flip = encoded["flip"].to(self.device, non_blocking=True)  # pinned by the loader on a GPU machine
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        return out.sub_(self.mean).div_(self.std).contiguous(memory_format=torch.channels_last)
