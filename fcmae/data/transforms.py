"""Pretraining and evaluation transforms.

`PretrainTransform` is FCMAE's augmentation (RandomResizedCrop scale 0.2-1 bicubic, horizontal flip, per-channel
normalization) with the decode folded in, so that it can:
- draw its crop and flip from a generator seeded by the sample (seed, epoch, index), instead of saving, seeding and
  restoring the three global RNGs (about 1.3 ms a sample: `torch.manual_seed` alone costs 0.7 ms);
- decode plain JPEGs with libjpeg-turbo straight into an array (simplejpeg: PIL's pixels bit for bit, without PIL's
  image object and its copy into an array; other formats, CMYK and EXIF-rotated JPEGs go through PIL);
- decode a JPEG at 1/2, 1/4 or 1/8 size (DCT scaling inside libjpeg, what PIL's `draft` does) when the crop is at
  least that many times larger than the output, so the crop is still downsampled, never upsampled (`draft=True`);
- take any number of channels: (H, W, C) float arrays from 16-bit PNG / TIFF / .npy go through torch's bicubic
  antialiased resize.

The crop is resized by torch's antialiased bicubic interpolation on the 8-bit pixels (`F.interpolate(uint8,
antialias=True)`, AVX2-vectorized, about 4.5x faster than PIL's resize on one core). Its filter is PIL's (a = -0.5,
the same support), so without draft (or when the crop is too small for it) the output has the crops and flips of
`pretrain_transform` under `seeded([seed, epoch, index])`, the torchvision pipeline the folder reader used before,
and its pixels to within a few 8-bit levels (rounding between the two passes: at most 4 levels and 0.02 on average
on ImageNet-like JPEGs at 224 px, up to 6 on a 12x downscale; tested). With draft the pixels
differ slightly more: the DCT-domain reduction is an 8x8-block average followed by PIL's bicubic resize from a
sub-pixel box, an antialiasing filter comparable to bicubic's own when downsampling by 2x or more (measured in
benchmarks/README.md).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

from .decoding import decode_jpeg_rgb, to_rgb
from .errors import DataError, FatalDataError


def pretrain_transform(size: tuple[int, int]) -> T.Compose:
    """FCMAE's augmentation as torchvision ops on a decoded RGB image (RandomResizedCrop scale 0.2-1 bicubic,
    horizontal flip, ImageNet normalization); draws from the global RNGs. `PretrainTransform` is the fast form."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])  # fmt: skip


def eval_transform(size: tuple[int, int], crop_pct: float = 0.875) -> T.Compose:
    """Resize the shorter side to max(size) / crop_pct, then center crop `size` (bicubic, ImageNet norm).

    At 224 this is the standard resize-256 / crop-224; other sizes keep the same ratio.
    """
    return T.Compose([
        T.Resize(int(max(size) / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])  # fmt: skip


def sample_generator(entropy: Sequence[int]) -> torch.Generator:
    """A CPU generator seeded as `seeded(entropy)` seeds the global one: the same draws, without touching it."""
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


def crop_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                generator: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `generator`: (top, left, h, w)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    in_ratio = width / height  # fallback: the central crop of the closest allowed ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PretrainTransform:
    """Decode + RandomResizedCrop (scale 0.2-1, bicubic) + horizontal flip + per-channel normalization.

    Called as `transform(image, entropy)` with an opened, not yet decoded PIL image (8-bit photos) or a (H, W, C)
    float32 array (`decoding.load_array`), and the sample's seed entropy [seed, epoch, index]. Returns a
    (C, H, W) float32 tensor, normalized; or with normalize=False, the pixels for `device_feed.DevicePixels` to normalize on
    the training device: uint8 for 8-bit photos (a quarter of float32's bytes to copy), float32 in [0, 1] for
    arrays (16-bit data keeps its precision).

    Args:
        size: output (H, W).
        mean, std: per-channel normalization of [0, 1] values; ImageNet's by default (3 channels).
        draft: reduced-size JPEG decoding where the crop allows it (see the module docstring).
        normalize: False leaves normalization to the device (see above).
    """

    decodes = True  # the dataset hands over opened images and seed entropy, not decoded images

    def __init__(self, size: tuple[int, int], mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, draft: bool = True,
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 normalize: bool = True):
        if len(mean) != len(std):
            raise DataError(f"mean has {len(mean)} values and std {len(std)}: give one per channel")
        self.size, self.draft, self.scale, self.ratio = tuple(size), draft, scale, ratio
        self.normalize = normalize
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    @property
    def in_chans(self) -> int:
        return len(self.mean)

    def __call__(self, image: Image.Image | np.ndarray, entropy: Sequence[int]) -> torch.Tensor:
        generator = sample_generator(entropy)
        if isinstance(image, np.ndarray):
            return self._array(image, generator)
        return self._photo(image, generator)

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.sub_(self.mean).div_(self.std)

    def _photo(self, img: Image.Image, generator: torch.Generator) -> torch.Tensor:
        width, height = img.size
        if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # displayed rotated by 90 degrees
            width, height = height, width
        top, left, h, w = crop_params(height, width, self.scale, self.ratio, generator)
        flip = torch.rand(1, generator=generator).item() < 0.5  # RandomHorizontalFlip's draw, after the crop's
        out_h, out_w = self.size
        reduction = min(h / out_h, w / out_w)
        k = next((k for k in (8, 4, 2) if reduction >= k), 1) if self.draft else 1  # JPEG DCT scaling by 1/k
        reduced = (img.size[0] // k, img.size[1] // k) if k > 1 else None  # both decoders keep at least this size
        array = decode_jpeg_rgb(img, reduced)
        if array is None:  # not a plain JPEG (other formats, CMYK, EXIF-rotated): PIL decodes, with its draft
            if reduced and img.format == "JPEG":
                img.draft(img.mode, reduced)
            array = np.asarray(to_rgb(img))
        factor = array.shape[1] / width  # 1, or the DCT scale libjpeg chose (1/2, 1/4, 1/8)
        if factor == 1:  # torchvision's crop; the resize in torch (see the module docstring)
            crop = torch.from_numpy(np.array(array[top:top + h, left:left + w]))  # (h, w, 3) uint8
            pixels = F.interpolate(crop.permute(2, 0, 1)[None], size=(out_h, out_w), mode="bicubic",
                                   antialias=True)[0]
        else:  # the crop box in the reduced image's coordinates (sub-pixel, which PIL's resize box allows)
            scale = 1 / round(1 / factor)  # the nominal scale: libjpeg rounds reduced sizes up
            box = (left * scale, top * scale, (left + w) * scale, (top + h) * scale)
            img = Image.fromarray(array).resize((out_w, out_h), Image.BICUBIC, box=box)
            pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        if flip:
            pixels = pixels.flip(-1)
        if not self.normalize:
            return pixels.contiguous()  # uint8
        return self._normalize(pixels.float().div_(255).contiguous())

    def _array(self, pixels: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        pixels = match_channels(pixels, self.in_chans)
        height, width = pixels.shape[:2]
        top, left, h, w = crop_params(height, width, self.scale, self.ratio, generator)
        flip = torch.rand(1, generator=generator).item() < 0.5
        crop = torch.from_numpy(pixels[top:top + h, left:left + w]).permute(2, 0, 1)[None].float()
        out = F.interpolate(crop, size=self.size, mode="bicubic", antialias=True, align_corners=False)[0]
        if flip:
            out = out.flip(-1)
        if not self.normalize:
            return out.contiguous()  # float32 in [0, 1]
        return self._normalize(out.contiguous())


def match_channels(pixels: np.ndarray, in_chans: int) -> np.ndarray:
    """(H, W, C) pixels with the channels a run expects: grayscale in an RGB run is repeated (as PIL's
    convert("RGB") does); any other disagreement is a config mistake, so no sample is skipped for it."""
    if pixels.shape[-1] == 1 and in_chans == 3:
        pixels = np.repeat(pixels, 3, axis=-1)
    if pixels.shape[-1] != in_chans:
        raise FatalDataError(f"image has {pixels.shape[-1]} channels, the data config expects {in_chans} "
                             "(--in-chans, and one --mean / --std value per channel)")
    return pixels


class EvalTransform:
    """Evaluation for images of any channel count (16-bit PNG / TIFF, .npy, N channels): resize the shorter side
    to max(size) / crop_pct (bicubic, antialiased), center crop `size`, per-channel normalization; what
    `eval_transform` does for RGB photos. Called as `transform(image, entropy)` with a (H, W, C) float32 array (or an
    opened 8-bit photo), as `PretrainTransform` is (entropy unused); returns (C, H, W) float32."""

    decodes = True

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875):
        if len(mean) != len(std):
            raise DataError(f"mean has {len(mean)} values and std {len(std)}: give one per channel")
        self.size, self.crop_pct = tuple(size), crop_pct
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    @property
    def in_chans(self) -> int:
        return len(self.mean)

    def __call__(self, pixels: Image.Image | np.ndarray, entropy: Sequence[int] = ()) -> torch.Tensor:
        if isinstance(pixels, Image.Image):  # an 8-bit photo among arrays
            pixels = np.asarray(to_rgb(pixels), dtype=np.float32) / 255
        pixels = match_channels(pixels, self.in_chans)
        height, width = pixels.shape[:2]
        short = int(max(self.size) / self.crop_pct)
        scale = short / min(height, width)
        resized_hw = (max(round(height * scale), self.size[0]), max(round(width * scale), self.size[1]))
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float()
        image = F.interpolate(image, size=resized_hw, mode="bicubic", antialias=True, align_corners=False)[0]
        top, left = (resized_hw[0] - self.size[0]) // 2, (resized_hw[1] - self.size[1]) // 2
        crop = image[:, top:top + self.size[0], left:left + self.size[1]]
        return crop.sub(self.mean).div_(self.std).contiguous()
