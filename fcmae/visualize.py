"""Reconstruction grids: what the model sees and what it fills in.

Each row shows one image: the original, the masked input (removed patches in gray), the reconstruction, and
the reconstruction with the visible patches pasted back. With norm_pix_loss the model predicts each patch
normalized by its own mean and variance, so the prediction is mapped back with the target patch's statistics.

    python -m fcmae.visualize --checkpoint output/fcmae_model.safetensors --images DIR --out grid.png
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision.utils import make_grid, save_image

from .checkpoints import load_model
from .config import OneLineArgumentParser
from .data import DataError, eval_transform, find_images, load_rgb
from .fcmae import FCMAE
from .masking import grid_size

__all__ = ["reconstruct", "reconstruction_grid", "save_reconstructions", "main"]


def _denormalize(imgs: Tensor) -> Tensor:
    mean = imgs.new_tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = imgs.new_tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (imgs * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruct(model: FCMAE, imgs: Tensor, mask: Tensor) -> Tensor:
    """(N, 3, H, W) normalized images, (N, L) mask -> (N, 3, H, W) reconstruction in the same normalized space."""
    grid = model.encoder.check_input(imgs)
    _, pred, mask = model(imgs, mask)
    pred = pred.float()
    if model.norm_pix_loss:  # undo the per-patch normalization with each target patch's own statistics
        target = model.patchify(imgs).float()
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    return model.unpatchify(pred, grid)


@torch.no_grad()
def reconstruction_grid(model: FCMAE, imgs: Tensor, mask: Tensor) -> Tensor:
    """A (3, H', W') picture in [0, 1]: one row per image of original | masked | reconstruction | pasted."""
    was_training = model.training
    model.eval()
    recon = reconstruct(model, imgs, mask)
    model.train(was_training)
    grid = model.encoder.check_input(imgs)
    p = model.patch_size
    removed = mask.view(-1, 1, grid[0], 1, grid[1], 1).expand(-1, 1, -1, p, -1, p)
    removed = removed.reshape(imgs.shape[0], 1, *imgs.shape[-2:]).to(imgs.dtype)
    original, recon = _denormalize(imgs.float()), _denormalize(recon)
    masked = original * (1 - removed) + 0.5 * removed
    pasted = original * (1 - removed) + recon * removed
    rows = torch.stack([original, masked, recon, pasted], dim=1).flatten(0, 1)  # (N * 4, 3, H, W)
    return make_grid(rows.cpu(), nrow=4, padding=2, pad_value=1.0)


def save_reconstructions(model: FCMAE, imgs: Tensor, path: str | Path, seed: int = 0) -> Path:
    """Draw a reproducible mask (from `seed`), build the grid and write it as a PNG."""
    grid = model.encoder.check_input(imgs)
    generator = torch.Generator(imgs.device).manual_seed(seed)
    mask = model.random_masking(imgs.shape[0], grid, generator=generator, device=imgs.device)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(reconstruction_grid(model, imgs, mask), path)
    return path


def load_images(paths: Sequence[Path], size: tuple[int, int]) -> Tensor:
    """Center crops of the readable images among `paths`, normalized: (N, 3, H, W)."""
    transform = eval_transform(size, crop_pct=1.0)
    images = []
    for path in paths:
        try:
            images.append(transform(load_rgb(path)))
        except Exception as e:  # an unreadable file is skipped, as in training
            print(f"skipping unreadable image {path}: {e}", file=sys.stderr)
    if not images:
        raise DataError("none of the given images could be read")
    return torch.stack(images)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m fcmae.visualize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="an fcmae model file (fcmae_model.safetensors), a pretraining run folder, or one of its "
                             "training-state folders (checkpoints/step_N)")
    parser.add_argument("--images", required=True, help="an image file or a folder of images (searched recursively)")
    parser.add_argument("--out", default="reconstructions.png", help="PNG to write")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--input-size", type=int, nargs="+", default=None, help="H [W]; default: the model's")
    parser.add_argument("--mask-ratio", type=float, default=None, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask")
    try:
        args = parser.parse_args(argv)
        if args.num_images < 1:
            raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
        if args.input_size and len(args.input_size) > 2:
            raise ValueError(f"--input-size takes one or two values (H [W]), got {len(args.input_size)}")
        if Path(args.out).is_dir() or Path(args.out).suffix.lower() != ".png":
            raise ValueError(f"--out must name a .png file, got {args.out}")
        overrides = {} if args.mask_ratio is None else {"mask_ratio": args.mask_ratio}
        model = load_model(args.checkpoint, **overrides).eval()
        size = tuple(args.input_size * 2)[:2] if args.input_size else tuple(model.config["img_size"])
        grid_size(size, model.patch_size)
        source = Path(args.images)
        paths = [source] if source.is_file() else find_images(source)[: args.num_images]
        imgs = load_images(paths, size)
        model.encoder.check_input(imgs)
        out = save_reconstructions(model, imgs, args.out, seed=args.seed)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(imgs)} images, mask ratio {model.mask_ratio})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
