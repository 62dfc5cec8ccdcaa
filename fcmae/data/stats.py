"""`fcmae-stats`: per-channel mean and std of a dataset, over a seeded sample of its images.

    fcmae-stats /data/cells --in-chans 4 --samples 2000
    python -m fcmae.data.stats 'shards/train-{000000..000099}.tar'

Values are computed on the scale the pretraining transform normalizes: 8-bit photos / 255, 16-bit images / 65535,
float arrays as stored. The output is the `mean` / `std` to put in the data config (ImageNet's are
0.485 0.456 0.406 / 0.229 0.224 0.225).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # python -m fcmae.data.stats: the command (fcmae.cli.stats), before torch imports
    from fcmae.cli.stats import main

    sys.exit(main())

from typing import NamedTuple

import numpy as np
from PIL import Image

from .datasets import describe_unreadable, unreadable_warning
from .decoding import to_rgb
from .errors import DataError, FatalDataError


class ChannelStats(NamedTuple):
    mean: list[float]  # per channel
    std: list[float]
    images: int  # images read
    unreadable: dict[int, str]  # dataset position -> "PATH: REASON" of each file skipped


def channel_stats(data_path: str, in_chans: int = 3, samples: int = 1000, seed: int = 0) -> ChannelStats:
    """Mean and std per channel over up to `samples` images drawn without replacement.

    An unreadable image is skipped as in training: a line on stderr names it, the next image of the draw takes its
    place, and `unreadable` lists it. An image with another channel count than `in_chans` stops it.
    """
    from .pretraining import pretrain_dataset

    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")

    dataset = pretrain_dataset(data_path, (32, 32), seed, mean=[0.0] * in_chans, std=[1.0] * in_chans)
    total = np.zeros(in_chans)
    squares = np.zeros(in_chans)
    pixels = images = 0
    unreadable: dict[int, str] = {}
    for position in np.random.default_rng(seed).permutation(len(dataset)).tolist():
        if images == samples:
            break
        try:
            image, name = dataset._open(position)
            values = np.asarray(to_rgb(image), dtype=np.float64) / 255 if isinstance(image, Image.Image) else image
        except FatalDataError:
            raise
        except Exception as e:  # the decoders raise many types for truncated, corrupt or foreign data
            unreadable[position] = describe_unreadable(dataset._name(position), e)
            print(unreadable_warning(unreadable[position]), file=sys.stderr)
            continue
        if values.shape[-1] != in_chans:
            raise ValueError(f"{name} has {values.shape[-1]} channels, not --in-chans {in_chans}")
        flat = values.reshape(-1, in_chans).astype(np.float64)
        total += flat.sum(0)
        squares += (flat**2).sum(0)
        pixels += len(flat)
        images += 1
    if not images:
        raise DataError(f"none of the {len(unreadable)} images read from {data_path} could be decoded")
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean**2, 0))
    return ChannelStats(mean.tolist(), std.tolist(), images, unreadable)
