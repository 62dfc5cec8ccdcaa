"""Reconstruction grids: what the model sees and what it fills in.

Each row shows one image, in labeled columns: the original; the masked input (removed patches in gray); the
reconstruction of the removed patches, which with norm_pix_loss is mapped back with each hidden patch's true mean
and std (the hidden pixels lend it brightness and contrast, so it flatters the model); the same with the true
pixels pasted at the visible positions; and the prediction alone, borrowing nothing from hidden pixels (with
norm_pix_loss: the pattern of each removed patch around its own mean colour). The loss ignores the prediction at
the visible positions, so it is untrained there: columns 3 and 5 show those positions gray.

    python -m fcmae.visualize --checkpoint output/fcmae_model.safetensors --images DIR --out grid.png
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # python -m fcmae.visualize: the command (fcmae.cli.visualize), before torch imports
    from fcmae.cli.visualize import main

    sys.exit(main())

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision.utils import make_grid, save_image

from .data import DataError, eval_transform, load_rgb
from .data.datasets import describe_unreadable, unreadable_warning
from .model import FCMAE

__all__ = ["COLUMNS", "reconstruct", "prediction_alone", "reconstruction_grid", "draw_reconstructions",
           "save_reconstructions", "sample_indices", "load_images"]


COLUMNS = ("original", "masked", "reconstruction of the hidden patches (with their true mean/std)",
           "reconstruction + visible pasted", "prediction alone (pattern of each hidden patch)")
GRAY = 0.5  # where a column shows nothing: the removed patches in column 2, the visible ones in columns 3 and 5


def _shown_channels(imgs: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, 3, H, W): RGB as it is; one or two channels: the first as gray; more than three: the
    first three."""
    if imgs.shape[1] == 3:
        return imgs
    return imgs[:, :3] if imgs.shape[1] > 3 else imgs[:, :1].expand(-1, 3, -1, -1)


def _preview(imgs: Tensor) -> Tensor:
    """(N, C, H, W) normalized images -> (N, 3, H, W) in [0, 1] to look at: RGB un-normalized with ImageNet's
    mean/std; one or two channels: the first as gray; more than three: the first three as RGB (each image stretched
    to [0, 1], since their mean/std are not known here)."""
    if imgs.shape[1] == 3:
        mean = imgs.new_tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
        std = imgs.new_tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
        return (imgs * std + mean).clamp(0, 1)
    rgb = _shown_channels(imgs)
    low = rgb.amin(dim=(1, 2, 3), keepdim=True)
    high = rgb.amax(dim=(1, 2, 3), keepdim=True)
    return (rgb - low) / (high - low).clamp_min(1e-6)


def _removed_pixels(model: FCMAE, mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """(N, L) mask -> (N, 1, H, W) float: 1 at the pixels of removed patches, 0 at visible ones."""
    p = model.patch_size
    removed = mask.view(-1, 1, grid[0], 1, grid[1], 1).expand(-1, 1, -1, p, -1, p)
    return removed.reshape(mask.shape[0], 1, grid[0] * p, grid[1] * p).float()


@torch.no_grad()
def reconstruct(model: FCMAE, imgs: Tensor, mask: Tensor) -> Tensor:
    """(N, C, H, W) normalized images, (N, L) mask -> (N, C, H, W) reconstruction in the same normalized space.

    With norm_pix_loss the model predicts each patch normalized by its own mean and variance; this maps it back
    with the target patch's statistics: the hidden pixels lend the reconstruction its brightness and contrast, so
    even an untrained model looks fair (`prediction_alone` borrows nothing). At the visible positions the
    prediction is untrained (the loss ignores it).
    """
    grid = model.encoder.check_input(imgs)
    _, pred, mask = model(imgs, mask)
    pred = pred.float()
    if model.norm_pix_loss:
        target = model.patchify(imgs).float()
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    return model.unpatchify(pred, grid)


@torch.no_grad()
def prediction_alone(model: FCMAE, imgs: Tensor, mask: Tensor) -> Tensor:
    """(N, C, H, W) normalized images, (N, L) mask -> (N, 3, H, W) in [0, 1]: what the model predicts for the
    removed patches, borrowing nothing from the hidden pixels; the visible positions gray.

    Without norm_pix_loss the prediction is the normalized pixels themselves, shown as `_preview` shows images.
    With it, the prediction is each patch normalized by its own mean and std over all its values in the normalized
    space (x - mean_c) / std_c. Times std_c, that is the patch's pixels divided by its (unknown) std, less one
    offset per channel that differs between the channels even for a gray patch (ImageNet's mean is not gray), the
    more the flatter the patch: kept, it turns gray patches blue. Removing each channel's mean over the patch
    leaves exactly the patch's pixels around its own mean colour, over its std: one scale for all channels, so gray
    stays gray and colour stays colour. Each image is then stretched once, all channels alike: mid-gray is each
    patch's mean, and +-3 RMS of the image's removed patches span the range. (Other channel counts than 3: their
    std is not known here, so each channel keeps its normalized scale.)
    """
    grid = model.encoder.check_input(imgs)
    _, pred, mask = model(imgs, mask)
    removed = _removed_pixels(model, mask, grid)
    if not model.norm_pix_loss:
        return _preview(model.unpatchify(pred.float(), grid)) * removed + GRAY * (1 - removed)
    channels = model.in_chans
    std = pred.new_tensor(IMAGENET_DEFAULT_STD if channels == 3 else [1.0] * channels, dtype=torch.float32)
    patches = pred.float().unflatten(-1, (-1, channels)) * std  # (N, L, p * p, C): (p, q, c) order
    pattern = patches - patches.mean(dim=2, keepdim=True)
    shown = _shown_channels(model.unpatchify(pattern.flatten(2), grid)) * removed
    rms = (shown.square().sum(dim=(1, 2, 3)) / (3 * removed.sum(dim=(1, 2, 3))).clamp_min(1)).sqrt()
    stretched = (GRAY + shown / (6 * rms.clamp_min(1e-6)).view(-1, 1, 1, 1)).clamp(0, 1)
    return stretched * removed + GRAY * (1 - removed)


@torch.no_grad()
def reconstruction_grid(model: FCMAE, imgs: Tensor, mask: Tensor, labels: bool = True) -> Tensor:
    """A (3, H', W') picture in [0, 1]: one row per image, the COLUMNS under a header that names them.

    The masked column shows removed patches gray; the two reconstruction columns show the visible positions gray
    (the prediction there is untrained), and the pasted column holds the true pixels there.
    """
    was_training = model.training
    model.eval()
    recon = reconstruct(model, imgs, mask)
    alone = prediction_alone(model, imgs, mask)
    model.train(was_training)
    removed = _removed_pixels(model, mask, model.encoder.check_input(imgs))
    original = imgs.float()
    pasted = original * (1 - removed) + recon * removed
    original, recon, pasted = (_preview(x) for x in (original, recon, pasted))
    masked = original * (1 - removed) + GRAY * removed
    recon = recon * removed + GRAY * (1 - removed)
    rows = torch.stack([original, masked, recon, pasted, alone], dim=1).flatten(0, 1)  # (N * 5, 3, H, W)
    picture = make_grid(rows.cpu(), nrow=len(COLUMNS), padding=2, pad_value=1.0)
    return _with_header(picture, imgs.shape[-1] + 2) if labels else picture


def _with_header(picture: Tensor, column: int) -> Tensor:
    """The picture under a white strip naming each column (words wrapped to the column width)."""
    font = ImageFont.load_default()
    lines = [_wrap(name, font, column - 4) for name in COLUMNS]
    line_height = font.getbbox("Ag")[3] + 2
    header = Image.new("RGB", (picture.shape[-1], 4 + line_height * max(len(x) for x in lines)), "white")
    draw = ImageDraw.Draw(header)
    for c, text in enumerate(lines):
        for i, line in enumerate(text):
            draw.text((2 + c * column + 2, 2 + i * line_height), line, fill="black", font=font)
    strip = torch.from_numpy(np.asarray(header).copy()).permute(2, 0, 1).float() / 255
    return torch.cat([strip, picture], dim=1)


def _wrap(text: str, font, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and font.getlength(candidate) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines


def draw_reconstructions(model: FCMAE, imgs: Tensor, seed: int = 0) -> Tensor:
    """The labeled grid for `imgs` under a reproducible mask drawn from `seed`: (3, H', W') in [0, 1]."""
    grid = model.encoder.check_input(imgs)
    generator = torch.Generator(imgs.device).manual_seed(seed)
    mask = model.random_masking(imgs.shape[0], grid, generator=generator, device=imgs.device)
    return reconstruction_grid(model, imgs, mask)


def save_reconstructions(model: FCMAE, imgs: Tensor, path: str | Path, seed: int = 0) -> Tensor:
    """Draw the grid (`draw_reconstructions`) and write it as a PNG; returns the grid."""
    picture = draw_reconstructions(model, imgs, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(picture, path)
    return picture


def sample_indices(count: int, available: int, seed: int) -> list[int]:
    """`count` distinct indices of `available`, drawn at random from `seed` (not the first files in order)."""
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:count].tolist())


def load_images(paths: Sequence[Path], size: tuple[int, int]) -> Tensor:
    """Center crops of the readable images among `paths`, normalized: (N, 3, H, W)."""
    transform = eval_transform(size, crop_pct=1.0)
    images = []
    for path in paths:
        try:
            images.append(transform(load_rgb(path)))
        except Exception as e:  # an unreadable file is skipped, as in training
            print(unreadable_warning(describe_unreadable(str(path), e)), file=sys.stderr)
    if not images:
        raise DataError("none of the given images could be read")
    return torch.stack(images)

