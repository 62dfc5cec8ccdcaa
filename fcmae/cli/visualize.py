"""Reconstruction grids: what the model sees and what it fills in.

    python -m fcmae.visualize --checkpoint output/fcmae_model.safetensors --images DIR --out grid.png

The grid's columns are described in fcmae.visualize.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..config.command_line import OneLineArgumentParser
from .exits import debugging, print_error, show_causes

__all__ = ["main"]


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
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask and of the images sampled")
    try:
        args = parser.parse_args(argv)
        if args.num_images < 1:
            raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
        if args.input_size and len(args.input_size) > 2:
            raise ValueError(f"--input-size takes one or two values (H [W]), got {len(args.input_size)}")
        if Path(args.out).is_dir() or Path(args.out).suffix.lower() != ".png":
            raise ValueError(f"--out must name a .png file, got {args.out}")
        # torch and the model import here, after the flags: --help and a bad flag answer at once.
        from ..checkpoints import load_model
        from ..data import find_images
        from ..masking import grid_size
        from ..visualize import load_images, sample_indices, save_reconstructions

        overrides = {} if args.mask_ratio is None else {"mask_ratio": args.mask_ratio}
        model = load_model(args.checkpoint, **overrides).eval()
        size = tuple(args.input_size * 2)[:2] if args.input_size else model.config.img_size
        grid_size(size, model.patch_size)
        source = Path(args.images)
        files = [source] if source.is_file() else find_images(source)
        paths = [files[i] for i in sample_indices(args.num_images, len(files), args.seed)]
        imgs = load_images(paths, size)
        model.encoder.check_input(imgs)
        save_reconstructions(model, imgs, args.out, seed=args.seed)
    except (ValueError, OSError) as e:
        if debugging():
            show_causes(e)
            raise
        print_error(str(e))
        return 2
    print(f"wrote {args.out} ({len(imgs)} images, mask ratio {model.mask_ratio})")
    return 0
