"""webdataset tar shards as a map-style dataset (through `wids`, webdataset's indexed reader), and their order.

A shard is a tar file whose members are named `key.ext` (webdataset's convention): the files of one sample are
adjacent and share the key, e.g. `n01440764_10026.jpg` (+ `n01440764_10026.cls`). Plain `tar --sort=name` writes
such shards, as do `fcmae-shards` and webdataset's ShardWriter.

`wids` indexes a shard's members once (a scan of the tar headers through mmap) and reads any sample by its
position, so the dataset is an ordinary map-style `Dataset`: the training loop's sampler, Accelerate's per-process
split and its `skip_first_batches` (exact mid-epoch resume without reading the skipped samples) work as they do for
image folders. Remote shards (http(s)://, s3://, gs://, `pipe:` commands) are downloaded whole into a local cache
by wids (under a file lock: the workers and processes of a machine share one copy) before they are indexed.

`ShardOrder` keeps reading local to a few shards at a time, which is what makes remote shards practical: each
process reads its own contiguous part of the epoch's shard order, shuffled within windows of a few shards.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
from torch.utils.data import Sampler

from .datasets import Samples, open_member
from .errors import DataError, FatalDataError
from .folders import IMAGE_EXTENSIONS

REMOTE = re.compile(r"^(https?|s3|gs|ftps?)://|^pipe:")
DESCRIPTOR = "dataset.json"  # what fcmae-shards writes beside the shards: wids's dataset description


class ShardUnavailable(FatalDataError):
    """A whole shard cannot be had (missing, download failed, not a tar): training stops, as for a missing folder.
    A damaged sample inside a readable shard is skipped and counted instead."""


def _wids():
    try:
        import braceexpand  # noqa: F401  (webdataset's brace patterns)
        import wids.wids
        import wids.wids_dl
        import wids.wids_specs
    except ImportError:
        raise DataError("reading tar shards needs webdataset's indexed reader: pip install 'fcmae[shards]'") from None
    return wids


def is_shards(data_path: str) -> bool:
    """Whether --data-path names shards: a .tar file or brace pattern, a wids .json description, a URL, or a
    folder with .tar files at its top."""
    if REMOTE.match(data_path) or data_path.endswith((".tar", ".json")) or re.search(r"\{\d+\.\.\d+\}", data_path):
        return True
    folder = Path(data_path).expanduser()
    return folder.is_dir() and any(folder.glob("*.tar"))


def cache_dir() -> Path:
    """Where remote shards are downloaded: $FCMAE_SHARD_CACHE, else ~/.cache/fcmae/shards."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fcmae" / "shards"
    return Path(os.environ.get("FCMAE_SHARD_CACHE", default))


def local_copy(url: str) -> str:
    """A local path for a shard: the file itself, or its copy in the cache (downloaded once, under a lock)."""
    if not REMOTE.match(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        if not os.path.isfile(path):
            raise ShardUnavailable(f"shard not found: {path}")
        return path
    wids = _wids()
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    local = str(folder / wids.wids.hash_dataset_name(url)) + "_" + os.path.basename(urlparse(url).path)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            wids.wids_dl.download_and_open(url, local, handlers=_download_commands(wids)).close()
    except (AssertionError, OSError, ValueError) as e:  # wids asserts that the download command succeeded
        with contextlib.suppress(OSError):
            os.remove(local)  # curl leaves a partial file behind
        raise ShardUnavailable(f"could not download shard {url}: {e}") from None
    return local


def _download_commands(wids) -> dict:
    """wids's download commands, with curl told to fail on HTTP errors (not to save a 404 page as the shard)."""
    commands = dict(wids.wids_dl.default_cmds)
    for scheme in ("http", "https", "ftp", "ftps"):
        commands[scheme] = "curl -f -s -S -L --retry 3 '{url}' -o '{local}'"
    return commands


def open_shard(url: str):
    """wids's index of one shard's samples (`len`, `[i]` -> {".jpg": stream, "__key__": ...})."""
    wids = _wids()
    path = local_copy(url)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return wids.wids.IndexedTarSamples(path=path)
    except Exception as e:  # a damaged header: struct, Unicode or value errors from the scan
        raise ShardUnavailable(f"shard {url} is not a readable tar file ({type(e).__name__}: {e})") from None


def shard_list(spec: str) -> list[dict[str, Any]]:
    """[{"url", "nsamples"}] for a brace pattern / .tar / URL, a wids .json description, or a folder of .tar
    files (whose dataset.json, if present and up to date, saves counting the samples)."""
    wids = _wids()
    if spec.endswith(".json"):
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                source = spec if REMOTE.match(spec) else os.path.abspath(spec)
                desc = wids.wids_specs.load_dsdesc_and_resolve(source, base=wids.wids_specs.urldir(source))
        except (AssertionError, OSError, ValueError, KeyError) as e:
            raise DataError(f"{spec} is not a readable wids dataset description: {e}") from None
        return [{"url": s["url"], "nsamples": int(s["nsamples"])} for s in desc["shardlist"]]
    folder = Path(spec).expanduser()
    if not REMOTE.match(spec) and folder.is_dir():
        urls = sorted(str(p) for p in folder.glob("*.tar"))
        known = {}
        if (folder / DESCRIPTOR).is_file():  # counts from the writer, kept where the file size still matches
            for s in json.loads((folder / DESCRIPTOR).read_text()).get("shardlist", []):
                known[str(folder / s["url"])] = (s["nsamples"], s.get("filesize"))
        return [{"url": u, "nsamples": known[u][0]} if u in known and known[u][1] == os.path.getsize(u) else
                {"url": u, "nsamples": len(open_shard(u))} for u in urls]
    import braceexpand

    urls = list(braceexpand.braceexpand(spec))
    return [{"url": u, "nsamples": len(open_shard(u))} for u in urls]


class ShardImages(Samples):
    """The image of every sample in a list of webdataset shards (see `Samples` for items and skipping).

    A sample's image is its first member with an image extension (.jpg, .png, .tif, .npy, ...); one without is
    skipped and counted like an unreadable image. `lru_size` shards stay open per process (mmapped).
    """

    def __init__(self, shards: Sequence[dict[str, Any]], transform: Callable, seed: int = 0, substitute: bool = True,
                 lru_size: int = 16):
        if not shards or not sum(s["nsamples"] for s in shards):
            raise DataError("the shards hold no samples")
        self.urls = [s["url"] for s in shards]
        self.lengths = np.array([s["nsamples"] for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
        self.lru_size = lru_size
        self._open_shards: OrderedDict[int, Any] = OrderedDict()
        super().__init__(transform, None, seed, substitute)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:  # open mmaps stay with their process; workers reopen what they need
        return {**self.__dict__, "_open_shards": OrderedDict()}

    def locate(self, position: int) -> tuple[int, int]:
        """(shard number, sample number inside it) of a dataset position."""
        shard = int(np.searchsorted(self.starts, position, side="right")) - 1
        return shard, position - int(self.starts[shard])

    def _shard(self, number: int):
        if number in self._open_shards:
            self._open_shards.move_to_end(number)
        else:
            self._open_shards[number] = open_shard(self.urls[number])
            if len(self._open_shards) > self.lru_size:
                self._open_shards.popitem(last=False)[1].close()
        return self._open_shards[number]

    def _open(self, position: int) -> tuple[Any, str]:
        shard, inner = self.locate(position)
        samples = self._shard(shard)
        if inner >= len(samples):
            raise DataError(f"shard {self.urls[shard]} holds {len(samples)} samples, its description says more")
        stream, name = open_member(samples[inner], IMAGE_EXTENSIONS)
        return self._decode(stream, name), name

    def _name(self, position: int) -> str:
        shard, inner = self.locate(position)
        return f"{self.urls[shard]} sample {inner}"


class ShardOrder(Sampler[int]):
    """The order of one epoch over shards: a pure function of (seed, epoch), the same on every process.

    1. The shards are shuffled (seeded by seed and epoch) and their samples laid end to end.
    2. That sequence is cut into `num_processes` equal contiguous parts of `batches * batch_size` samples, where
       batches = len // (num_processes * batch_size). The rest, fewer than num_processes * batch_size samples
       (a different tail each epoch), is left out of the epoch, as drop_last does for image folders.
    3. Each part is shuffled within consecutive windows of `window` samples: a process reads a few shards at a time.
    4. The parts' batches are interleaved (process 0's first batch, process 1's first, ...), because Accelerate
       hands batch i to process i % num_processes: process r then trains on exactly part r, in order.

    Every sample of the epoch is therefore seen once, by one process; the DataLoader workers of a process share
    its part (worker w reads batches w, w + workers, ...). Resuming skips batches by index, without reading them.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, num_processes: int = 1, seed: int = 0,
                 window: int = 4096):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.num_processes, self.seed, self.window = batch_size, num_processes, seed, window
        self.batches = int(self.lengths.sum()) // (batch_size * num_processes)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches * self.batch_size * self.num_processes

    def order(self, epoch: int) -> np.ndarray:
        """(num_processes, batches, batch_size) sample positions of one epoch."""
        rng = np.random.default_rng([self.seed, epoch, 0x5A4D])
        starts = np.concatenate([[0], np.cumsum(self.lengths)])
        shards = rng.permutation(len(self.lengths))
        sequence = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in shards])
        per_process = self.batches * self.batch_size
        parts = sequence[: per_process * self.num_processes].reshape(self.num_processes, per_process)
        for part in parts:
            for start in range(0, per_process, self.window):
                window = part[start:start + self.window]
                window[:] = rng.permutation(window)
        return parts.reshape(self.num_processes, self.batches, self.batch_size)

    def __iter__(self) -> Iterator[int]:
        interleaved = self.order(self.epoch).transpose(1, 0, 2)  # batch-major: b0 of every process, b1, ...
        for batch in interleaved.reshape(-1, self.batch_size):  # not one 14M-element Python list
            yield from batch.tolist()


def shard_dataset(spec: str, transform: Callable, seed: int) -> ShardImages:
    """`ShardImages` for a --data-path naming shards (see `is_shards`)."""
    return ShardImages(shard_list(spec), transform, seed=seed)
