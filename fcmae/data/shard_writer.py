"""`fcmae-shards`: write an image folder as webdataset tar shards, plus the wids description (dataset.json).

    fcmae-shards /data/imagenet/train shards/ --prefix train --maxcount 1000
    python pretrain.py --data-path 'shards/train-{000000..001281}.tar'    # or --data-path shards/

Files are stored byte for byte (no re-encoding), in a seeded shuffled order so that every shard mixes the classes
(the reader then only shuffles within a few shards at a time). A file's key is its path relative to the folder,
extension and dots dropped (`n01440764/n01440764_10026.JPEG` -> `n01440764/n01440764_10026.jpeg`); its class
folder, if any, is kept in the key.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # python -m fcmae.data.shard_writer: the command (fcmae.cli.shards), before torch imports
    from fcmae.cli.shards import main

    sys.exit(main())

import json
import os
from pathlib import Path

import numpy as np

from .errors import DataError
from .file_index import FileIndex
from .shards import DESCRIPTOR


def write_shards(source: str | Path, output: str | Path, prefix: str = "train", maxcount: int = 1000,
                 maxsize: float = 1e9, seed: int = 0, shuffle: bool = True) -> list[dict]:
    """Write every image under `source` into output/prefix-000000.tar, ...; returns the shard list written to
    output/dataset.json ({"url", "nsamples", "filesize"} per shard)."""
    try:
        import webdataset
    except ImportError:
        raise DataError("writing shards needs webdataset: pip install 'fcmae[shards]'") from None
    if maxcount < 1:
        raise DataError(f"maxcount must be at least 1, got {maxcount}")
    files = FileIndex.load(source)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if any(output.glob(f"{prefix}-*.tar")):
        raise DataError(f"{output} already holds {prefix}-*.tar shards; choose an empty folder or another --prefix")
    order = np.random.default_rng(seed).permutation(len(files)) if shuffle else np.arange(len(files))
    counts: list[int] = []
    pattern = str(output / f"{prefix}-%06d.tar")
    with webdataset.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=0.0) as sink:
        for i in order:
            relative = files.relative(int(i))
            stem, ext = os.path.splitext(relative)
            key = stem.replace(".", "_")
            sink.write({"__key__": key, ext[1:].lower(): (files.root / relative).read_bytes()})
            shard = sink.shard - 1  # the shard the sample went into
            counts += [0] * (shard + 1 - len(counts))
            counts[shard] += 1
    names = [f"{prefix}-{n:06d}.tar" for n in range(len(counts))]
    shards = [{"url": name, "nsamples": count, "filesize": os.path.getsize(output / name)}
              for name, count in zip(names, counts)]
    (output / DESCRIPTOR).write_text(json.dumps({"wids_version": 1, "name": prefix, "shardlist": shards}, indent=1))
    return shards
