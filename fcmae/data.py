"""Image folders (labeled or not), the embedded demo photos, transforms, and unreadable-file skipping.

Augmentation is a pure function of (seed, epoch, sample index): every sample draws its random crop and flip
from its own seeded generator. A run therefore sees the same pixels whatever the number of workers or
processes, and a resumed run continues with exactly the data the uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import transforms as T

__all__ = [
    "IMAGE_EXTENSIONS", "DataError", "find_images", "find_labeled_images", "demo_image_files", "load_rgb",
    "ImageFiles", "pretrain_transform", "eval_transform", "pretrain_dataset", "seeded", "preserved_rng",
    "write_digits", "resolve_data_path",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

# Real photos shipped inside scikit-image's wheel: the embedded demo needs no download.
DEMO_FILES = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "clock_motion.png", "coffee.png", "coins.png",
    "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
    "motorcycle_right.png", "retina.jpg", "rocket.jpg",
)  # fmt: skip


class DataError(ValueError):
    """A data path that cannot be used (missing, empty, or without the expected layout)."""


def _image_files(root: Path) -> list[Path]:
    """Image files under `root`, recursively, sorted.

    Follows symlinked folders, as torchvision's ImageFolder does (dataset subsets are often class folders linked
    in), but never a link back to a folder on the way down or above it, so a link loop cannot hang the scan.
    Hidden files and folders (names starting with ".": .ipynb_checkpoints, macOS ._* files) are left out.
    """

    def loops(target: str, chain: frozenset[str]) -> bool:
        return any(c == target or c.startswith(target.rstrip(os.sep) + os.sep) for c in chain)

    top = os.fspath(root)
    chains = {top: frozenset()}  # folder -> the real folders on the way down to it from root
    files = []
    for folder, subfolders, names in os.walk(top, followlinks=True):
        chain = chains.pop(folder) | {os.path.realpath(folder)}
        subfolders[:] = [d for d in subfolders
                         if not d.startswith(".") and not loops(os.path.realpath(os.path.join(folder, d)), chain)]
        chains.update((os.path.join(folder, d), chain) for d in subfolders)
        files += [Path(folder, n) for n in names
                  if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(p for p in files if p.is_file())


def find_images(root: str | Path) -> list[Path]:
    """All image files under `root`, recursively (see `_image_files`), sorted. DataError if there is none."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path not found or not a folder: {root}")
    files = _image_files(root)
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files


def find_labeled_images(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """ImageFolder layout: one subfolder per class, images anywhere below it. Returns files, labels, classes."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path not found or not a folder: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subfolders (expected {root}/<class>/<image>)")
    files, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = _image_files(root / name)
        files += found
        labels += [label] * len(found)
        if not found:
            empty.append(name)
    if empty:
        raise DataError(f"class folder(s) without images in {root}: {', '.join(empty[:8])}")
    return files, labels, classes


def demo_image_files() -> list[Path]:
    """The demo photos inside the installed scikit-image package."""
    try:
        import skimage.data
    except ImportError:
        raise DataError("the demo photos come with scikit-image: pip install 'fcmae[demo]'") from None

    folder = Path(skimage.data.__file__).parent
    files = [folder / name for name in DEMO_FILES if (folder / name).is_file()]
    if not files:
        raise DataError(f"scikit-image's sample photos are missing from {folder}; reinstall scikit-image")
    return files


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB: EXIF rotation applied, grayscale / palette / alpha / CMYK / 16-bit handled."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16"):  # 16-bit grayscale: the full 0-65535 range maps to 0-255
            pixels = np.asarray(img, dtype=np.float32) / 257.0
            img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        elif img.mode in ("I", "F"):  # 32-bit int or float grayscale: no fixed range, so guess it from the data
            pixels = np.asarray(img, dtype=np.float32)
            peak = 1.0 if img.mode == "F" and pixels.max() <= 1.0 else 65535.0 if pixels.max() > 255 else 255.0
            img = Image.fromarray((pixels / peak * 255).clip(0, 255).astype(np.uint8))
        return img.convert("RGB")


class ImageFiles(Dataset):
    """Images from a list of files, optionally labeled, with per-sample seeded augmentation.

    An unreadable file is skipped and a warning names it. For training, the next readable file in the list
    takes its place, and the sample's `skipped` field counts the files passed over (the training loop keeps the
    running total). For evaluation (`substitute=False`) nothing takes its place, since that would count another
    image twice: the item is a black image marked `readable` False, which evaluation leaves out.

    Each item is a dict: image (3, H, W) float tensor, label (int, -1 when unlabeled), skipped (int), readable
    (bool).
    """

    def __init__(
        self,
        files: Sequence[Path],
        transform: Callable[[Image.Image], torch.Tensor],
        labels: Sequence[int] | None = None,
        seed: int = 0,
        substitute: bool = True,
    ):
        self.files, self.transform, self.seed, self.substitute = list(files), transform, seed, substitute
        self.labels = list(labels) if labels is not None else [-1] * len(self.files)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Called by the data loader at each epoch: augmentations differ between epochs."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        for skipped in range(len(self.files)):
            position = (index + skipped) % len(self.files)
            try:
                img = load_rgb(self.files[position])
            except Exception as e:  # PIL raises many types for truncated, corrupt or foreign files
                warnings.warn(f"skipping unreadable image {self.files[position]}: {e}", stacklevel=2)
                if self.substitute:
                    continue
                return {"image": self.transform(Image.new("RGB", (32, 32))), "label": self.labels[index],
                        "skipped": 1, "readable": False}
            with preserved_rng():
                seeded([self.seed, self.epoch, index])
                image = self.transform(img)
            return {"image": image, "label": self.labels[position], "skipped": skipped, "readable": True}
        raise DataError(f"none of the {len(self.files)} images could be read (first: {self.files[0]})")


def seeded(entropy: Sequence[int]) -> None:
    """Seed torch's, numpy's and Python's global RNGs (torchvision, timm's RandAugment and Mixup use all three)."""
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@contextlib.contextmanager
def preserved_rng():
    """Restore the CPU RNG states of torch, numpy and Python on exit."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def pretrain_transform(size: tuple[int, int]) -> T.Compose:
    """FCMAE's augmentation: RandomResizedCrop (scale 0.2-1, bicubic), horizontal flip, ImageNet normalization."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])  # fmt: skip


def eval_transform(size: tuple[int, int], crop_pct: float = 0.875) -> T.Compose:
    """Resize the shorter side to max(size) / crop_pct, then center crop `size` (bicubic, ImageNet norm).

    At 224 this is the standard resize-256 / crop-224; other sizes keep the same ratio.
    """
    return T.Compose([
        T.Resize(int(max(size) / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])  # fmt: skip


def resolve_data_path(data_path: str) -> Path:
    """A data folder; "digits:FOLDER" first writes scikit-learn's digits there (see write_digits)."""
    if not data_path:
        raise DataError("data_path is empty: pass --data-path FOLDER (or --data-path demo for the sample photos)")
    if data_path.startswith("digits:"):
        folder = data_path.split(":", 1)[1]
        if not folder:
            raise DataError("digits: needs a folder to write the digits to, e.g. --data-path digits:output/digits")
        return write_digits(Path(folder).expanduser())
    return Path(data_path).expanduser()  # "~/photos" from a YAML file or --data-path=~/photos, which no shell expands


def pretrain_dataset(data_path: str, size: tuple[int, int], seed: int) -> ImageFiles:
    """Unlabeled images for pretraining: "demo" for the embedded photos, else a folder (its train/ if present)."""
    if data_path == "demo":
        files = demo_image_files()
    else:
        root = resolve_data_path(data_path)
        files = find_images(root / "train" if (root / "train").is_dir() else root)
    return ImageFiles(files, pretrain_transform(size), seed=seed)


def write_digits(root: str | Path, val_fraction: float = 0.2, seed: int = 0, limit: int | None = None) -> Path:
    """Write scikit-learn's handwritten digits (1797 real 8x8 scans, 10 classes, shipped inside the package) in
    the ImageNet layout: root/train/<digit>/*.png and root/val/<digit>/*.png (the first `limit` of a seeded
    shuffle, if given). Nothing is written if root/val exists. Returns root."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits come with scikit-learn: pip install 'fcmae[demo]'") from None

    root = Path(root)
    if (root / "val").is_dir():
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} exists and is not a digits dataset; name a new or empty folder after digits:")
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))[:limit]
    num_val = int(len(order) * val_fraction)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted earlier call
    for rank, index in enumerate(order):
        split = "val" if rank < num_val else "train"
        folder = tmp / split / str(digits.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[index] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:04d}.png")
    if root.exists():
        root.rmdir()  # empty, checked above
    tmp.replace(root)
    return root
