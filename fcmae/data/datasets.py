"""Map-style datasets over image files or shard samples, with seeded augmentation and unreadable-sample skipping.

An unreadable file is not reported where it fails (a DataLoader worker, started afresh each epoch and evaluation
pass): items and batches carry it to the process that counts it, which prints `unreadable_warning` once per run.

Augmentation is a pure function of (seed, epoch, sample index): every sample draws its random crop and flip from
its own seeded generator. A run therefore sees the same pixels whatever the number of workers or processes, and a
resumed run continues with exactly the data the uninterrupted run would have seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from .decoding import as_stream, load_array, open_image, to_rgb
from .errors import DataError, FatalDataError
from .seeding import preserved_rng, seeded

ARRAY_SUFFIXES = (".npy", ".tif", ".tiff")  # read as float arrays (any channel count, 16 bits), not 8-bit RGB


class Samples(Dataset):
    """Base of the datasets: subclasses say how many samples there are and how to open one (`_open`).

    An unreadable sample is skipped, silently here: the item says which (`unreadable`), and the process that
    consumes the batches warns once per file and run (the training loop, `fcmae.evaluation.evaluate`). For
    training, the next readable one takes its place, and the item's `skipped` field counts the samples passed over.
    For evaluation (`substitute=False`) nothing takes its place, since that would count another image twice: the
    item is a black image marked `readable` False, which evaluation leaves out.

    `unreadable` maps the dataset positions that failed while the item was built (index, index + 1, ... for
    training; index itself for evaluation) to "PATH: REASON" (`describe_unreadable`), so len(unreadable) ==
    skipped. `skipped` counts skip events, and a bad file counts again each time it is tried (in a later epoch, or
    by the item of the position before it, which skipped over it); the positions identify the files.

    The transform is either a `transforms.PretrainTransform` (`decodes`: it gets the opened image or array and the
    sample's seed entropy) or any callable on a decoded RGB PIL image (timm / torchvision transforms), run with
    the global RNGs seeded from (seed, epoch, index).

    Each item is a dict: image (C, H, W) float tensor, label (int, -1 when unlabeled), skipped (int), readable
    (bool), unreadable (dict int -> str). Batch the items with `CollateUnreadable`: default_collate cannot batch
    the unreadable dicts, whose lengths differ.

    `reported`: the positions whose warning this process printed. Only the consuming process's copy of the
    dataset uses it (workers' copies are thrown away), so evaluation warns once per run, not once per pass.
    """

    def __init__(self, transform: Callable, labels: Sequence[int] | np.ndarray | None, seed: int, substitute: bool):
        self.transform, self.seed, self.substitute = transform, seed, substitute
        self.labels = np.asarray(labels if labels is not None else np.full(len(self), -1), dtype=np.int64)
        # In shared memory: persistent DataLoader workers hold their own copy of the dataset, and must still see
        # the epoch the main process sets (their augmentations differ between epochs).
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.reported: set[int] = set()

    def __len__(self) -> int:
        raise NotImplementedError

    def _open(self, position: int) -> tuple[Any, str]:
        """(opened PIL image or (H, W, C) float array, a name for messages) of one sample."""
        raise NotImplementedError

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Called by the data loader at each epoch, before its workers are given the epoch's first indices:
        augmentations differ between epochs."""
        self._epoch.fill_(epoch)

    def _decode(self, source: Any, name: str) -> Image.Image | np.ndarray:
        """A file or stream -> an opened PIL image (photos) or a float array (.npy, TIFF, and any file when the
        transform wants other than 3 channels)."""
        arrays = getattr(self.transform, "in_chans", 3) != 3 or Path(name).suffix.lower() in ARRAY_SUFFIXES
        return load_array(source, name) if arrays else open_image(source)

    def _transformed(self, index: int, image: Image.Image | np.ndarray) -> torch.Tensor:
        entropy = [self.seed, self.epoch, index]
        if getattr(self.transform, "decodes", False):
            return self.transform(image, entropy)
        if not isinstance(image, Image.Image):
            raise DataError("arrays (.npy, TIFF, other than 3 channels) need a PretrainTransform")
        image = to_rgb(image)
        with preserved_rng():
            seeded(entropy)
            return self.transform(image)

    def __getitem__(self, index: int) -> dict:
        error, unreadable = None, {}
        for skipped in range(len(self)):
            position = (index + skipped) % len(self)
            try:
                image, name = self._open(position)
                image = self._transformed(index, image)
            except FatalDataError:
                raise
            except Exception as e:  # PIL, tifffile and numpy raise many types for truncated, corrupt or foreign data
                error = e
                unreadable[position] = describe_unreadable(self._name(position), e)
                if self.substitute:
                    continue
                black = np.zeros((32, 32, getattr(self.transform, "in_chans", 3)), dtype=np.float32)
                image = self._transformed(index, black if getattr(self.transform, "decodes", False) else
                                          Image.new("RGB", (32, 32)))  # shaped as the readable images are
                return {"image": image, "label": int(self.labels[index]), "skipped": 1, "readable": False,
                        "unreadable": unreadable}
            return {"image": image, "label": int(self.labels[position]), "skipped": skipped, "readable": True,
                    "unreadable": unreadable}
        raise DataError(f"none of the {len(self)} images could be read (first: {self._name(0)}; last error: {error})")

    def _name(self, position: int) -> str:
        return str(position)


def describe_unreadable(name: str, error: BaseException) -> str:
    """'NAME: REASON' on one line, for a file that could not be read: how items and batches carry it."""
    reason = " ".join(str(error).split()) or type(error).__name__
    return f"{name}: {reason}"


def unreadable_warning(described: str) -> str:
    """The line that reports a skipped file (`describe_unreadable`'s text), printed on stderr once per run."""
    return f"warning: skipped unreadable image {described}"


def new_unreadable_warnings(found: Mapping[int, str], reported: set[int]) -> list[str]:
    """The warning lines for the files of `found` (position -> 'PATH: REASON') not in `reported`, in position
    order; adds them to `reported`."""
    new = sorted(set(found) - reported)
    reported.update(new)
    return [unreadable_warning(found[position]) for position in new]


class CollateUnreadable:
    """DataLoader collate_fn for `Samples` items: `collate` (default_collate, `collate_encoded`, ...) batches
    every field but `unreadable`; the batch's "unreadable" is a plain dict instead: the distinct dataset positions
    found unreadable while its items were built, ascending, each with its 'PATH: REASON' ({} for most batches).

    Not a tensor: Accelerate's send_to_device leaves it on the host, so the training loop can keep the set of bad
    positions (distinct files, unlike the summed `skipped` events) without reading the device, and the process
    that consumes the batches warns about each file once, wherever it failed (a worker, another rank). A class
    rather than a closure, so that it pickles for workers that are spawned rather than forked.
    """

    def __init__(self, collate: Callable[[list[dict]], dict] = default_collate):
        self.collate = collate

    def __call__(self, items: list[dict]) -> dict:
        batch = self.collate([{k: v for k, v in item.items() if k != "unreadable"} for item in items])
        found = {position: text for item in items for position, text in item["unreadable"].items()}
        batch["unreadable"] = dict(sorted(found.items()))
        return batch


class ImageFiles(Samples):
    """Images from a list of files (or a `FileIndex`), optionally labeled; see `Samples`."""

    def __init__(self, files: Sequence[Path], transform: Callable, labels: Sequence[int] | None = None,
                 seed: int = 0, substitute: bool = True):
        self.files = files if hasattr(files, "blob") else list(files)  # a FileIndex stays packed
        super().__init__(transform, labels, seed, substitute)

    def __len__(self) -> int:
        return len(self.files)

    def _name(self, position: int) -> str:
        return str(self.files[position])

    def _open(self, position: int) -> tuple[Any, str]:
        path = self.files[position]
        return self._decode(path, path.name), path.name


def open_member(sample: dict, extensions: Sequence[str]) -> tuple[Any, str]:
    """The first member of a webdataset sample whose extension is an image's: (stream, "key.ext")."""
    for ext in extensions:
        if ext in sample:
            return as_stream(sample[ext]), f"{sample.get('__key__', '')}{ext}"
    members = sorted(k for k in sample if not k.startswith("__"))
    raise DataError(f"sample {sample.get('__key__')!r} has no image member (it has {members or 'nothing'})")
