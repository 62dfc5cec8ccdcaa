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
- `pretraining`: `pretrain_dataset` and `pretrain_sampler`, chosen by --data-path.

Imported on first use (PEP 562): `python -m fcmae.data.stats --help` answers without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:  # what __getattr__ imports, for type checkers and readers
    from .datasets import CollateUnreadable, ImageFiles, Samples
    from .decoding import load_array, load_rgb
    from .device_feed import DeviceFeed, DevicePixels, collate_pixels
    from .errors import DataError
    from .file_index import FileIndex
    from .folders import (
        IMAGE_EXTENSIONS,
        demo_image_files,
        find_images,
        find_labeled_images,
        resolve_data_path,
        walk_images,
        write_digits,
    )
    from .gpu_augment import DeviceAugment, EncodedCrop, collate_encoded
    from .pretraining import pretrain_dataset, pretrain_sampler
    from .seeding import preserved_rng, seeded
    from .shards import ShardImages, ShardOrder, is_shards
    from .transforms import EvalTransform, PretrainTransform, eval_transform, pretrain_transform

# name -> the module that defines it
_ATTRIBUTES = {
    **dict.fromkeys(["CollateUnreadable", "ImageFiles", "Samples"], ".datasets"),
    **dict.fromkeys(["load_array", "load_rgb"], ".decoding"),
    **dict.fromkeys(["DeviceFeed", "DevicePixels", "collate_pixels"], ".device_feed"),
    "DataError": ".errors", "FileIndex": ".file_index",
    **dict.fromkeys(["IMAGE_EXTENSIONS", "demo_image_files", "find_images", "find_labeled_images",
                     "resolve_data_path", "walk_images", "write_digits"], ".folders"),
    **dict.fromkeys(["DeviceAugment", "EncodedCrop", "collate_encoded"], ".gpu_augment"),
    **dict.fromkeys(["pretrain_dataset", "pretrain_sampler"], ".pretraining"),
    **dict.fromkeys(["preserved_rng", "seeded"], ".seeding"),
    **dict.fromkeys(["ShardImages", "ShardOrder", "is_shards"], ".shards"),
    **dict.fromkeys(["EvalTransform", "PretrainTransform", "eval_transform", "pretrain_transform"], ".transforms"),
}
__all__ = list(_ATTRIBUTES)

__getattr__, __dir__ = lazy_exports(__name__, _ATTRIBUTES)
