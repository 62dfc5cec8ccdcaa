"""Data for pretraining and fine-tuning: image folders, webdataset shards, decoding, transforms.

- `folders`: finding images in a folder tree; the demo photos and digits.
- `file_index`: the file list of a large folder in numpy arrays, cached and checked against the folder.
- `shards`: webdataset tar shards (local or remote) as a map-style dataset, and their per-epoch order.
- `shard_writer`: `fcmae-shards`, a folder written as shards.
- `decoding`: one file -> 8-bit RGB, or a float array of any channel count and bit depth.
- `transforms`: the pretraining augmentation (fast, seeded per sample) and the evaluation transform.
- `datasets`: the datasets over files, with unreadable-sample skipping; `CollateUnreadable` batches their items.
- `gpu_augment`: `--gpu-augment`, JPEGs decoded (nvjpeg) and augmented on the device in batches.
- `device_feed`: uint8 batches normalized on the device, moved one step ahead on a side stream.
- `stats`: `fcmae-stats`, per-channel mean and std over a sample of the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch.utils.data import Sampler

from .datasets import CollateUnreadable, ImageFiles, Samples
from .decoding import load_array, load_rgb
from .errors import DataError
from .file_index import FileIndex
from .folders import (
    IMAGE_EXTENSIONS, demo_image_files, find_images, find_labeled_images, resolve_data_path, walk_images, write_digits,
)
from .device_feed import DeviceFeed, DevicePixels, collate_pixels
from .gpu_augment import DeviceAugment, EncodedCrop, augment_batch, collate_encoded
from .seeding import preserved_rng, seeded
from .shards import ShardImages, ShardOrder, is_shards, shard_dataset
from .transforms import EvalTransform, PretrainTransform, eval_transform, pretrain_transform

__all__ = [
    "IMAGE_EXTENSIONS", "DataError", "find_images", "find_labeled_images", "demo_image_files", "load_rgb",
    "load_array", "ImageFiles", "Samples", "ShardImages", "ShardOrder", "FileIndex", "PretrainTransform",
    "EvalTransform", "pretrain_transform", "eval_transform", "pretrain_dataset", "pretrain_sampler", "seeded",
    "preserved_rng", "write_digits", "resolve_data_path", "walk_images", "is_shards", "EncodedCrop", "DeviceAugment", "augment_batch",
    "collate_encoded", "CollateUnreadable", "DeviceFeed", "DevicePixels", "collate_pixels",
]


def pretrain_dataset(data_path: str, size: tuple[int, int], seed: int, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, draft: bool = True, encoded: bool = False,
                     normalize: bool = True) -> Samples:
    """Unlabeled images for pretraining, by --data-path:

    - "demo": the embedded photos; "digits:FOLDER": scikit-learn's digits written to FOLDER;
    - webdataset shards: a brace pattern `shards/train-{000000..000099}.tar`, one .tar, a folder of .tar files,
      a wids dataset description (.json), or any of these as an http(s)/s3/gs URL;
    - an image folder (its train/ if present), indexed once and cached (`FileIndex`).

    mean / std: per-channel normalization (their length is the channel count; ImageNet's 3 by default).
    encoded: items are `gpu_augment.EncodedCrop`'s (bytes + crop + flip, collated by
    `CollateUnreadable(collate_encoded)`, finished on the device by `augment_batch`, which normalizes) instead of
    `PretrainTransform`'s tensors. normalize=False: pixels for `DevicePixels` (uint8 photos, batched by
    `collate_pixels`), normalized on the training device.
    """
    if (mean is None) != (std is None):
        raise DataError("give both mean and std (one value per channel), or neither for ImageNet's")
    if encoded:
        transform = EncodedCrop()
    else:
        transform = PretrainTransform(size, *(() if mean is None else (mean, std)), draft=draft, normalize=normalize)
    if data_path == "demo":
        return ImageFiles(demo_image_files(), transform, seed=seed)
    if data_path and not data_path.startswith("digits:") and is_shards(data_path):
        return shard_dataset(data_path, transform, seed)
    root = resolve_data_path(data_path)
    return ImageFiles(FileIndex.load(root / "train" if (root / "train").is_dir() else root), transform, seed=seed)


def pretrain_sampler(dataset: Samples, batch_size: int, num_processes: int, seed: int) -> Sampler | None:
    """The training order for a dataset: `ShardOrder` for shards (reads a few shards at a time, each process its
    own part), None for files (the loader then shuffles, with Accelerate's seeded sampler)."""
    if isinstance(dataset, ShardImages):
        return ShardOrder(dataset.lengths, batch_size, num_processes, seed)
    return None
