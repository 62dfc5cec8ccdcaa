"""The pretraining dataset and its order, chosen by --data-path: the demo photos, the digits, webdataset shards or
an image folder."""

from __future__ import annotations

from typing import Sequence

from torch.utils.data import Sampler

from .datasets import ImageFiles, Samples
from .errors import DataError
from .file_index import FileIndex
from .folders import demo_image_files, resolve_data_path
from .gpu_augment import EncodedCrop
from .shards import ShardImages, ShardOrder, is_shards, shard_dataset
from .transforms import PretrainTransform

__all__ = ["pretrain_dataset", "pretrain_sampler"]


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
    `CollateUnreadable(collate_encoded)`, finished on the device by `DeviceAugment`, which normalizes) instead of
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
