"""Image folders (labeled or not), the embedded demo photos, and scikit-learn's digits written as a folder."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

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

SHOWN_SKIPS = 3  # skipped entries a warning names; it counts the rest


class Scan(NamedTuple):
    """What `walk_images` found under a folder; paths are relative to it ("" is the folder itself)."""

    files: list[str]  # the image files, sorted
    folders: list[str]  # every folder visited, unreadable ones included (FileIndex checks their mtimes)
    skipped: list[tuple[str, str]]  # (path, reason), sorted: what the scan could not read, so its images are missing


def walk_images(root: str | Path) -> Scan:
    """The image files under `root`, the folders visited and the entries that could not be read.

    Follows symlinked folders, as torchvision's ImageFolder does (dataset subsets are often class folders linked
    in), but never a link back to a folder on the way down or above it, so a link loop cannot hang the scan.
    Hidden files and folders (names starting with ".": .ipynb_checkpoints, macOS ._* files) are left out.
    Uses os.scandir's entry types, so a file costs no stat call: 1M files take seconds, not minutes.

    A folder it cannot list (permissions) and a link it cannot follow (x.jpg -> x.jpg, a -> b -> a: ELOOP) are
    skipped, not fatal, and listed in `skipped`: the callers report them (`warn_skipped`), since the images
    behind them are silently missing from the dataset otherwise.
    """

    def loops(target: str, chain: frozenset[str]) -> bool:
        return any(c == target or c.startswith(target.rstrip(os.sep) + os.sep) for c in chain)

    top = os.fspath(root)
    scan = Scan([], [], [])
    stack = [("", frozenset())]  # (folder relative to root, the real folders on the way down to it)
    while stack:
        rel, chain = stack.pop()
        folder = os.path.join(top, rel) if rel else top
        chain = chain | {os.path.realpath(folder)}
        scan.folders.append(rel)
        try:
            entries = list(os.scandir(folder))
        except OSError as e:  # unreadable, or vanished since its parent was listed
            scan.skipped.append((rel, _reason(e)))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = os.path.join(rel, entry.name) if rel else entry.name
            try:  # is_dir follows links, and raises for one that loops; is_file runs for image names only
                is_dir = entry.is_dir()
                is_image = not is_dir and entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file()
            except OSError as e:
                scan.skipped.append((path, _reason(e)))
                continue
            if is_dir and not loops(os.path.realpath(entry.path), chain):
                stack.append((path, chain))
            elif is_image:
                scan.files.append(path)
    scan.files.sort()
    scan.skipped.sort()
    return scan


def _reason(error: OSError) -> str:
    """Why a path was skipped, in the OS's words: permission denied, too many levels of symbolic links, ..."""
    return error.strerror.lower() if error.strerror else type(error).__name__


def still_unreadable(path: str) -> bool:
    """Whether `walk_images` would still skip `path`: a folder it cannot list, or a link it cannot follow."""
    try:
        if os.path.isdir(path):  # False, not an error, for a looping link
            os.scandir(path).close()
        else:
            os.stat(path)
    except OSError:
        return True
    return False


def warn_skipped(root: str | Path, skipped: Sequence[tuple[str, str]]) -> None:
    """One line on stderr naming the first few entries a scan of `root` skipped (`Scan.skipped`), and counting the
    rest; nothing when there are none.

    Only the first process of a run prints it (RANK 0, or no RANK: torchrun and accelerate launch set it): every
    process scans, or loads the index of, the same folder.
    """
    if not skipped or os.environ.get("RANK", "0") != "0":
        return
    shown = ", ".join(f"{path or '.'} ({reason})" for path, reason in skipped[:SHOWN_SKIPS])
    more = f" and {len(skipped) - SHOWN_SKIPS} more" if len(skipped) > SHOWN_SKIPS else ""
    print(f"warning: skipped {len(skipped)} unreadable folder(s) or link(s) under {root}, their images left out: "
          f"{shown}{more}", file=sys.stderr)


def find_images(root: str | Path) -> list[Path]:
    """All image files under `root`, recursively (see `walk_images`), sorted. DataError if there is none."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path not found or not a folder: {root}")
    scan = walk_images(root)
    warn_skipped(root, scan.skipped)
    if not scan.files:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return [root / f for f in scan.files]


def find_labeled_images(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """ImageFolder layout: one subfolder per class, images anywhere below it. Returns files, labels, classes.

    Files are ordered by class, then by path within it; files directly in `root` belong to no class.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path not found or not a folder: {root}")
    scan = walk_images(root)  # one scan, so one warning for the whole tree
    warn_skipped(root, scan.skipped)
    classes = sorted(f for f in scan.folders if f and os.sep not in f)
    if not classes:
        raise DataError(f"{root} has no class subfolders (expected {root}/<class>/<image>)")
    label_of = {name: label for label, name in enumerate(classes)}
    found = sorted((label_of[f.split(os.sep, 1)[0]], f) for f in scan.files if os.sep in f)
    labels = [label for label, _ in found]
    present = set(labels)
    empty = [name for label, name in enumerate(classes) if label not in present]
    if empty:
        raise DataError(f"class folder(s) without images in {root}: {', '.join(empty[:8])}")
    return [root / f for _, f in found], labels, classes


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
