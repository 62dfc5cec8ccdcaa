"""Images/s per data-loader worker process for the full pretraining transform, folders and shards.

Each variant does one worker's work (read, decode, transform, collate) on the same ImageNet-like JPEGs, made from the
sample photos (sizes from 400x350 to 1000x750, quality 90, about half of them 500x375 or 375x500 as in ImageNet):
decode, RandomResizedCrop (scale 0.2-1, bicubic) to --size, horizontal flip, normalize, collate.

  before      the previous pipeline: PIL decode to RGB, torchvision's Compose under seeded() / preserved_rng()
              (the three global RNGs saved, seeded and restored for every sample)
  fast        PretrainTransform, draft off: the same pixels, bit for bit, drawn from a per-sample generator
  fast+draft  PretrainTransform, draft on (the default): JPEGs decoded at 1/2, 1/4, 1/8 size when the crop allows

Variants are interleaved in rounds and the median is reported. The main number is images per CPU-second of the
process doing the work: on a shared machine wall-clock rates follow the load, CPU time much less. With --output FILE the
table is written as Markdown.

    nice -n -10 python benchmarks/loader.py --images 384 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fcmae.data import (  # noqa: E402
    FileIndex, ImageFiles, PretrainTransform, demo_image_files, load_rgb, pretrain_transform,
)
from fcmae.data.gpu_augment import DeviceAugment, EncodedCrop, collate_encoded  # noqa: E402
from fcmae.data.shard_writer import write_shards  # noqa: E402
from fcmae.data.shards import shard_dataset  # noqa: E402

SIZES = [(500, 375), (375, 500), (500, 333), (400, 350), (350, 400), (640, 480), (800, 600), (1000, 750)]
WEIGHTS = [0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]


def write_imagenet_like(folder: Path, count: int, seed: int = 0) -> None:
    """`count` JPEGs (quality 90) of ImageNet-like sizes, resized crops of the sample photos."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [load_rgb(p) for p in demo_image_files()]
    for i in range(count):
        width, height = SIZES[rng.choice(len(SIZES), p=WEIGHTS)]
        photo = photos[i % len(photos)]
        side = int(min(photo.size) * rng.uniform(0.6, 1.0))
        left, top = rng.integers(0, photo.width - side + 1), rng.integers(0, photo.height - side + 1)
        photo.crop((left, top, left + side, top + side)).resize((width, height)).save(folder / f"{i:05d}.jpg",
                                                                                     quality=90)


def rate(dataset, batch_size: int, batches: int, collate=None) -> tuple[float, float]:
    """(images per CPU second, images per wall second) of the work one worker process does for `batches`
    batches: read, decode, transform, collate. Run in this process (num_workers=0: the same work without the
    hand-over), so that CPU time can be measured; CPU time is what a worker costs, and it hardly changes with the
    load of a shared machine, while wall time does."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True,
                        generator=torch.Generator().manual_seed(0), collate_fn=collate)
    it = iter(loader)
    next(it)  # files opened, caches warm
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(batches):
        next(it)
    images = batches * batch_size
    return images / (time.process_time() - cpu), images / (time.perf_counter() - wall)


def device_rate(files: FileIndex, size: tuple[int, int], batch_size: int, device: str, repeats: int = 5) -> str:
    """Images/s of DeviceAugment (decode, crop, batched resize, flip, normalize) on `device`, batches already
    collated."""
    batch = next(iter(DataLoader(ImageFiles(files, EncodedCrop()), batch_size=batch_size,
                                 collate_fn=collate_encoded)))["image"]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    augment = DeviceAugment(device, size)
    augment(batch)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        augment(batch)
    sync()
    seconds = (time.perf_counter() - start) / repeats
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU (logic check, not a speed target)"
    return f"gpu-augment device half on {name}: {batch_size / seconds:.0f} img/s (batch {batch_size})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--gpu-augment", action="store_true",
                        help="also the --gpu-augment path: its worker half, and its device half on --device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = (args.size, args.size)
    batches = args.images // args.batch_size - 1
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "jpegs", Path(tmp) / "shards"
        write_imagenet_like(folder, args.images)
        write_shards(folder, shards, maxcount=128)
        files = FileIndex.load(folder, cache=Path(tmp) / "index.npz")
        variants = {
            "folder, before": ImageFiles(files, pretrain_transform(size)),
            "folder, fast": ImageFiles(files, PretrainTransform(size, draft=False)),
            "folder, fast+draft": ImageFiles(files, PretrainTransform(size)),
            "shards, before": shard_dataset(str(shards), pretrain_transform(size), 0),
            "shards, fast+draft": shard_dataset(str(shards), PretrainTransform(size), 0),
        }
        collates = {}
        if args.gpu_augment:
            variants["folder, gpu-augment worker half"] = ImageFiles(files, EncodedCrop())
            collates["folder, gpu-augment worker half"] = collate_encoded
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        load_before = os.getloadavg()[0]
        for r in range(args.rounds):
            for name, dataset in variants.items():
                results[name].append(rate(dataset, args.batch_size, batches, collates.get(name)))
                print(f"round {r}: {name}: {results[name][-1][0]:.1f} img/CPU-s, {results[name][-1][1]:.1f} img/s",
                      file=sys.stderr)
        device_line = device_rate(files, size, args.batch_size, args.device) if args.gpu_augment else ""
    import PIL

    before = statistics.median(cpu for cpu, _ in results["folder, before"])
    lines = [f"{args.images} JPEGs, {args.size} px, batch {args.batch_size}, Pillow {PIL.__version__}, median of "
             f"{args.rounds} interleaved rounds; 1-min load average {load_before:.2f} before, "
             f"{os.getloadavg()[0]:.2f} after", "",
             "| variant | img per CPU-second (one worker) | vs before | img/s wall (rounds) |", "|---|---|---|---|"]
    for name, values in results.items():
        cpu = statistics.median(c for c, _ in values)
        walls = ", ".join(f"{w:.0f}" for _, w in values)
        lines.append(f"| {name} | {cpu:.1f} | {cpu / before:.2f}x | {walls} |")
    if args.gpu_augment:
        lines += ["", device_line]
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
