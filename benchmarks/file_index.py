"""Indexing a folder of many files: build time, cached load time, and memory per data-loader worker.

Makes a tree of --files empty .jpg files (1000 per folder) unless --root names an existing one, then measures:
  build        FileIndex.load(rebuild=True): the scan (os.scandir, no stat per file), sort and packing
  cached load  FileIndex.load: reading the .npz and checking every folder's mtime
  worker MiB   private memory a DataLoader worker adds after one pass over every entry (as an epoch touches
               them), for the packed FileIndex and for the list of Paths the folder reader used before
               (reading a list element writes its reference count, which un-shares the page under fork)

    nice -n -10 python benchmarks/file_index.py --files 1000000 --keep /tmp/million
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fcmae.data import FileIndex  # noqa: E402


def private_mib() -> float:
    """This process's private (un-shared) memory: Private_Clean + Private_Dirty of /proc/self/smaps_rollup."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


class Sweep(Dataset):
    """One item: the private memory a worker gains by reading every entry of `files` once."""

    def __init__(self, files):
        self.files = files

    def __len__(self) -> int:
        return 1

    def __getitem__(self, _):
        before = private_mib()
        for i in range(len(self.files)):
            self.files[i]
        return private_mib() - before


def worker_memory(root: Path, cache: Path, packed: bool) -> float:
    """MiB a forked worker makes private in one pass over the cached index, packed or as a list of Paths."""
    index = FileIndex.load(root, cache=cache)
    files = index if packed else [index[i] for i in range(len(index))]
    return next(iter(DataLoader(Sweep(files), batch_size=None, num_workers=1)))


def make_tree(root: Path, count: int, per_folder: int = 1000) -> None:
    for start in range(0, count, per_folder):
        folder = root / f"{start // per_folder:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, min(start + per_folder, count)):
            os.close(os.open(folder / f"{i:08d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="make (or reuse) the tree here instead of a temporary folder")
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)  # the worker-memory child's arguments
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_memory:
        print(worker_memory(args.root, args.cache, args.worker_memory == "FileIndex"))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp) / "tree"
        if not root.is_dir():
            start = time.perf_counter()
            make_tree(root, args.files)
            print(f"made {args.files} files in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        cache = Path(tmp) / "index.npz"
        start = time.perf_counter()
        index = FileIndex.load(root, cache=cache, rebuild=True)
        build = time.perf_counter() - start
        start = time.perf_counter()
        index = FileIndex.load(root, cache=cache)
        cached = time.perf_counter() - start
        packed_mib = (index.blob.nbytes + index.offsets.nbytes) / 2**20
        workers = {}
        for variant in ("FileIndex", "list of Paths"):  # each in a fresh process, as a later run starts
            out = subprocess.run([sys.executable, __file__, "--root", str(root), "--cache", str(cache),
                                  "--worker-memory", variant], capture_output=True, text=True, check=True)
            workers[variant] = float(out.stdout.split()[-1])
        print(f"| files | build (s) | cached load (s) | index size (MiB) | worker MiB, FileIndex | worker MiB, list of "
              f"Paths | cache file (MiB) |\n|---|---|---|---|---|---|---|\n| {len(index)} | {build:.1f} | {cached:.2f} | "
              f"{packed_mib:.0f} | {workers['FileIndex']:.0f} | {workers['list of Paths']:.0f} | "
              f"{cache.stat().st_size / 2**20:.0f} |")
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
