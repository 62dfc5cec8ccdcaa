"""`fcmae-stats`: per-channel mean and std of a dataset, over a seeded sample of its images.

    fcmae-stats /data/cells --in-chans 4 --samples 2000
    python -m fcmae.data.stats 'shards/train-{000000..000099}.tar'

Values are computed on the scale the pretraining transform normalizes: 8-bit photos / 255, 16-bit images / 65535,
float arrays as stored. The output is the `mean` / `std` to put in the data config (ImageNet's are
0.485 0.456 0.406 / 0.229 0.224 0.225).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np
from PIL import Image

from .decoding import to_rgb


def channel_stats(data_path: str, in_chans: int = 3, samples: int = 1000, seed: int = 0
                  ) -> tuple[list[float], list[float], int]:
    """(mean, std, images read) per channel over up to `samples` images drawn without replacement."""
    from . import pretrain_dataset

    dataset = pretrain_dataset(data_path, (32, 32), seed, mean=[0.0] * in_chans, std=[1.0] * in_chans)
    positions = np.random.default_rng(seed).permutation(len(dataset))[:samples]
    total = np.zeros(in_chans)
    squares = np.zeros(in_chans)
    pixels = 0
    for position in positions:
        image, name = dataset._open(int(position))
        values = np.asarray(to_rgb(image), dtype=np.float64) / 255 if isinstance(image, Image.Image) else image
        if values.shape[-1] != in_chans:
            raise ValueError(f"{name} has {values.shape[-1]} channels, not --in-chans {in_chans}")
        flat = values.reshape(-1, in_chans).astype(np.float64)
        total += flat.sum(0)
        squares += (flat**2).sum(0)
        pixels += len(flat)
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean**2, 0))
    return mean.tolist(), std.tolist(), len(positions)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fcmae-stats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_path", help="anything --data-path accepts (folder, shards, demo)")
    parser.add_argument("--in-chans", type=int, default=3, help="channels per image (default: 3)")
    parser.add_argument("--samples", type=int, default=1000, help="images to read (default: 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def run(_):
        mean, std, count = channel_stats(args.data_path, args.in_chans, args.samples, args.seed)
        print(f"# {count} images of {args.data_path}\nmean: [{', '.join(f'{m:.4f}' for m in mean)}]\n"
              f"std: [{', '.join(f'{s:.4f}' for s in std)}]")

    from ..training import run_cli

    return run_cli(run, [])


if __name__ == "__main__":
    sys.exit(main())
