"""Image folders (labeled or not), the embedded demo photos, and scikit-learn's digits written as a folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".npy",
)  # fmt: skip

# Real photos shipped inside scikit-image's wheel: the embedded demo needs no download.
DEMO_FILES = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "clock_motion.png", "coffee.png", "coins.png",
    "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
    "motorcycle_right.png", "retina.jpg", "rocket.jpg",
)  # fmt: skip


def walk_images(root: str | Path) -> tuple[list[str], list[str]]:
    """Image files under `root` (paths relative to it, sorted) and every folder visited (relative, "" = root).

    Follows symlinked folders, as torchvision's ImageFolder does (dataset subsets are often class folders linked
    in), but never a link back to a folder on the way down or above it, so a link loop cannot hang the scan.
    Hidden files and folders (names starting with ".": .ipynb_checkpoints, macOS ._* files) are left out.
    Uses os.scandir's entry types, so a file costs no stat call: 1M files take seconds, not minutes.
    """

    def loops(target: str, chain: frozenset[str]) -> bool:
        return any(c == target or c.startswith(target.rstrip(os.sep) + os.sep) for c in chain)

    top = os.fspath(root)
    files, folders = [], []
    stack = [("", frozenset())]  # (folder relative to root, the real folders on the way down to it)
    while stack:
        rel, chain = stack.pop()
        folder = os.path.join(top, rel) if rel else top
        chain = chain | {os.path.realpath(folder)}
        folders.append(rel)
        try:
            entries = list(os.scandir(folder))
        except OSError:  # unreadable or vanished folder: skipped, as os.walk does
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = os.path.join(rel, entry.name) if rel else entry.name
            if entry.is_dir():  # follows links
                if not loops(os.path.realpath(entry.path), chain):
                    stack.append((path, chain))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                files.append(path)
    files.sort()
    return files, folders


def find_images(root: str | Path) -> list[Path]:
    """All image files under `root`, recursively (see `walk_images`), sorted. DataError if there is none."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path not found or not a folder: {root}")
    files = [root / f for f in walk_images(root)[0]]
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
        found = [root / name / f for f in walk_images(root / name)[0]]
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
