"""Random patch masks for FCMAE.

Convention, used everywhere in this package: a mask is a float tensor of shape (N, L), L = gh * gw patches in
raster order, with 0 = keep (visible) and 1 = remove (hidden). This is the convention of MAE and of the official
ConvNeXt V2 release.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .patch_grid import grid_size, kept_per_sample

__all__ = ["grid_size", "random_mask", "kept_per_sample", "check_mask", "apply_keep"]


def random_mask(
    batch_size: int,
    grid: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw a (N, L) mask that removes the same number of patches from every sample.

    Each sample keeps exactly int(L * (1 - mask_ratio)) patches, the ones with the smallest Gaussian noise, as
    the official `gen_random_mask` does (so a seeded global RNG gives the official masks). Pass `generator` for
    a reproducible stream of masks that does not touch the global RNG; it must live on `device`.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if not isinstance(batch_size, numbers.Integral) or batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
    if len(grid) != 2 or any(not isinstance(g, numbers.Integral) or g < 1 for g in grid):
        raise ValueError(f"grid must be two positive ints (gh, gw), got {grid!r}")
    gh, gw = grid
    num_patches = gh * gw
    len_keep = kept_per_sample(num_patches, mask_ratio)
    if device is None and generator is not None:
        device = generator.device
    noise = torch.randn(batch_size, num_patches, generator=generator, device=device)
    ids_keep = noise.argsort(dim=1)[:, :len_keep]
    mask = torch.ones(batch_size, num_patches, device=noise.device)
    return mask.scatter_(1, ids_keep, 0.0)  # 0 is keep, 1 is remove


def check_mask(mask: Tensor, batch_size: int, grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """Validate a user-supplied mask and return it as float (N, L) with values in {0, 1}, on `device`."""
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a tensor of shape (N, L), got {type(mask).__name__}")
    num_patches = grid[0] * grid[1]
    if mask.shape != (batch_size, num_patches):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected ({batch_size}, {num_patches}) for a batch of "
            f"{batch_size} images with a {grid[0]}x{grid[1]} patch grid"
        )
    mask = mask.to(device=device, dtype=torch.float32)
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError("mask values must be 0 (keep) or 1 (remove)")
    return mask


def apply_keep(x: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """Zero the removed patches of a channels-last feature map: (N, H, W, C) -> (N, H, W, C).

    H = gh * k and W = gw * k for k sites per patch side. The keep factor is broadcast over whole (k, C) rows,
    which vectorizes far better than a (N, H, W, 1) map broadcast over C alone.
    """
    n, height, width, channels = x.shape
    gh, gw = grid
    keep = (1.0 - mask).to(x.dtype).view(n, gh, 1, gw, 1, 1)
    x = x.view(n, gh, height // gh, gw, width // gw, channels) * keep
    return x.view(n, height, width, channels)
