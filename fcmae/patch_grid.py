"""The patch grid of an input and how many patches a mask keeps: plain arithmetic, no torch, so that the model
config (and with it `--help`) imports nothing heavy. `fcmae.masking` draws the masks on this grid."""

from __future__ import annotations

import numbers

__all__ = ["grid_size", "kept_per_sample"]


def grid_size(img_size: int | tuple[int, int], patch_size: int = 32) -> tuple[int, int]:
    """Patch grid (gh, gw) of an image of `img_size` (an int for square, or (H, W)).

    Raises ValueError unless H and W are positive multiples of `patch_size`.
    """
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in size):
        raise ValueError(f"image size must be an int or (H, W) ints, got {img_size!r}")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0 or h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch_size} (e.g. 224 or 256x192)")
    return h // patch_size, w // patch_size


def kept_per_sample(num_patches: int, mask_ratio: float) -> int:
    """Patches each sample keeps in a mask drawn by `random_mask`: int(L * (1 - mask_ratio)), as the official code."""
    return int(num_patches * (1 - mask_ratio))
