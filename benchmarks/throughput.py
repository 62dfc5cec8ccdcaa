"""Pretraining throughput (images/s) and whether the data loader keeps up.

Three numbers for one model, size and batch:
  loader      the data pipeline alone (JPEG decode, RandomResizedCrop, flip, normalize) with --num-workers;
  step        the training step alone (forward, backward, AdamW) on images already in memory;
  pretrain    pretrain.py end to end on the same files, as reported in its metrics.jsonl.
The loader is not the bottleneck when it delivers well above the step's rate.

    python benchmarks/throughput.py                       # atto, 224 px, batch 16, CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fcmae  # noqa: E402
from fcmae.data import demo_image_files, load_rgb, pretrain_dataset  # noqa: E402


def write_jpegs(folder: Path, count: int) -> None:
    """ImageNet-like files: 500x375 JPEG crops of the sample photos."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [load_rgb(p) for p in demo_image_files()]
    for i in range(count):
        img = photos[i % len(photos)].resize((500, 375)) if i % 2 else photos[i % len(photos)].resize((375, 500))
        img.save(folder / f"{i:05d}.jpg", quality=90)


def loader_rate(data: Path, size: int, batch_size: int, workers: int, batches: int) -> float:
    dataset = pretrain_dataset(str(data), (size, size), seed=0)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)
    it = iter(loader)
    next(it)  # workers started
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def step_rate(model_name: str, size: int, batch_size: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = fcmae.create_model(model_name, img_size=size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    imgs = torch.randn(batch_size, 3, size, size)

    def step() -> None:
        loss, _, _ = model(imgs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def pretrain_rate(
    model_name: str, data: Path, out: Path, size: int, batch_size: int, workers: int, steps: int
) -> float:
    import pretrain

    argv = ["--model", model_name, "--data-path", str(data), "--output-dir", str(out), "--input-size", str(size),
            "--batch-size", str(batch_size), "--num-workers", str(workers), "--max-steps", str(steps),
            "--log-every", "1", "--save-every", str(steps + 1), "--vis-every", "0", "--warmup-steps", "1"]
    pretrain.main(argv)
    AcceleratorState._reset_state(reset_partial_state=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["images_per_s"] for r in records[2:])  # after warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnextv2_atto")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    step = step_rate(args.model, args.img_size, args.batch_size, repeats=5)  # first, in a fresh process
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        write_jpegs(data, (args.steps + 2) * args.batch_size)  # one epoch covers every measurement
        loader = loader_rate(data, args.img_size, args.batch_size, args.num_workers, batches=args.steps)
        end_to_end = pretrain_rate(args.model, data, Path(tmp) / "run", args.img_size, args.batch_size,
                                   args.num_workers, args.steps)
    print(f"{args.model}, {args.img_size} px, batch {args.batch_size}, {args.num_workers} workers, "
          f"{torch.get_num_threads()} threads")
    print("| loader alone (img/s) | training step alone (img/s) | pretrain.py end to end (img/s) |")
    print("|---|---|---|")
    print(f"| {loader:.1f} | {step:.1f} | {end_to_end:.1f} |")


if __name__ == "__main__":
    main()
