"""The file list of a large image folder: packed in numpy arrays, cached in an index file built once.

A Python list of 14M path strings costs about 1.5 GB per process, and every DataLoader worker ends up with its
own copy: reading a list element writes its reference count, which un-shares the page under fork. Here the
relative paths are one uint8 buffer plus an int64 offset array (about 8 bytes per file on top of the path's own
characters) that workers share, read-only.

The index is written once to an `.npz` file under ~/.cache/fcmae (`$XDG_CACHE_HOME/fcmae`; not into the data
folder, which may be read-only and whose mtime the file would change). Later runs (and every other rank, after the main process built it) load it in well under a second
if the folder has not changed: the cache records the modification time of every folder it walked (a file added,
removed or renamed changes its folder's mtime), the root's real path and the file count. The order is sorted, so
every rank sees the same index.

The cache also records what the scan could not read (`walk_images`' skipped folders and links), so every run that
loads the index prints the scan's warning about them again, not only the run that built it. A recorded entry that
has become readable makes the next load rebuild: a chmod does not change any folder's mtime.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .errors import DataError
from .folders import IMAGE_EXTENSIONS, still_unreadable, walk_images, warn_skipped

VERSION = 2  # 2: the skipped entries are recorded


def _pack(strings: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (uint8 buffer of their UTF-8 bytes, int64 offsets of length n + 1)."""
    encoded = [s.encode() for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _unpack(blob: np.ndarray, offsets: np.ndarray, index: int) -> str:
    return blob[offsets[index]:offsets[index + 1]].tobytes().decode()


def _mtimes(root: str, folders: list[str]) -> np.ndarray:
    """The mtime (ns) of each folder; -1 for one that is gone."""
    out = np.empty(len(folders), dtype=np.int64)
    for i, rel in enumerate(folders):
        try:
            out[i] = os.stat(os.path.join(root, rel)).st_mtime_ns
        except OSError:
            out[i] = -1
    return out


class FileIndex:
    """The image files under a folder, sorted; `index[i]` is a Path, `len(index)` the count.

    Build or load it with `FileIndex.load(root)`. Picklable and small to send to workers: it holds two arrays.
    """

    def __init__(self, root: str | Path, blob: np.ndarray, offsets: np.ndarray):
        self.root, self.blob, self.offsets = Path(root), blob, offsets

    @classmethod
    def from_paths(cls, root: str | Path, relative: list[str]) -> "FileIndex":
        return cls(root, *_pack(relative))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> Path:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self.root / _unpack(self.blob, self.offsets, index % len(self))

    def relative(self, index: int) -> str:
        return _unpack(self.blob, self.offsets, index)

    @classmethod
    def load(cls, root: str | Path, cache: str | Path | None = None, rebuild: bool = False) -> "FileIndex":
        """The index of `root`, from its cache file if that is still valid, else built and cached.

        DataError if `root` is not a folder or holds no image files. `cache`: the index file (default:
        ~/.cache/fcmae/index-<hash of root's real path>.npz). An unwritable cache only costs the next run a rebuild.
        Prints the scan's one-line warning (`warn_skipped`) when it skipped unreadable folders or links, whether
        the index was built now or loaded.
        """
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"data path not found or not a folder: {root}")
        real = os.path.realpath(root)
        path = Path(cache) if cache else _user_cache(real)
        saved = None if rebuild else cls._read_valid(path, real)
        if saved is not None:
            blob, offsets, skipped = saved
            warn_skipped(root, skipped)
            return cls(root, blob, offsets)
        scan = walk_images(root)
        warn_skipped(root, scan.skipped)
        if not scan.files:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        mtimes = _mtimes(real, scan.folders)  # after the walk: a change during it makes the next run rebuild
        blob, offsets = _pack(scan.files)
        folder_blob, folder_offsets = _pack(scan.folders)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, version=VERSION, root=real, blob=blob, offsets=offsets, folder_blob=folder_blob,
                     folder_offsets=folder_offsets, mtimes=mtimes,
                     skipped=np.array(scan.skipped, dtype=str).reshape(-1, 2))  # rows of (path, reason)
            os.replace(tmp, path)  # atomic: a reader sees the old index or the new one
        except OSError:
            pass
        return cls(root, blob, offsets)

    @staticmethod
    def _read_valid(path: Path, real_root: str) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]] | None:
        """(blob, offsets, skipped) from an index file that matches the folder as it is now, else None."""
        try:
            with np.load(path) as saved:
                if int(saved["version"]) != VERSION or str(saved["root"]) != real_root:
                    return None
                folder_blob, folder_offsets = saved["folder_blob"], saved["folder_offsets"]
                folders = [_unpack(folder_blob, folder_offsets, i) for i in range(len(folder_offsets) - 1)]
                if not np.array_equal(_mtimes(real_root, folders), saved["mtimes"]):
                    return None
                skipped = [(rel, reason) for rel, reason in saved["skipped"].tolist()]
                if not all(still_unreadable(os.path.join(real_root, rel)) for rel, _ in skipped):
                    return None  # e.g. a folder chmod-ed readable: its images belong in the index now
                return saved["blob"], saved["offsets"], skipped
        except (OSError, ValueError, KeyError):  # missing, partial or foreign file: rebuild
            return None


def _user_cache(real_root: str) -> Path:
    digest = hashlib.sha256(real_root.encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "fcmae" / f"index-{digest}.npz"
