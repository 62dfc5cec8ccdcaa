"""Pretraining throughput (images/s) and whether the data loader keeps up, with and without --gpu-augment.

For one model, size and batch, on the same ImageNet-like JPEGs (`loader.write_imagenet_like`):
  loader      the CPU data pipeline alone (JPEG decode, RandomResizedCrop, flip, normalize) with --num-workers;
  step        the training step alone (forward, backward, AdamW) on images already on the device;
  pretrain    pretrain.py end to end, as reported in its metrics.jsonl (median over steps, after two), once with
              the CPU pipeline and once with --gpu-augment (workers read files; nvjpeg decodes, the device crops).
The loader is not the bottleneck when pretrain.py runs near the step's rate.

    python benchmarks/throughput.py                                   # atto, 224 px, batch 16, CPU
    python benchmarks/throughput.py --batch-size 128 --num-workers 14 --mixed-precision bf16 --steps 40   # a GPU
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
from fcmae.data import pretrain_dataset  # noqa: E402
from fcmae.training import configure_cuda  # noqa: E402
from loader import write_imagenet_like  # noqa: E402  (benchmarks/loader.py)


def loader_rate(data: Path, size: int, batch_size: int, workers: int, batches: int) -> float:
    dataset = pretrain_dataset(str(data), (size, size), seed=0)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)
    batches = min(batches, len(loader) - 1)  # within one epoch
    it = iter(loader)
    next(it)  # workers started
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def step_rate(model_name: str, size: int, batch_size: int, repeats: int, device: torch.device,
              dtype: torch.dtype | None) -> float:
    torch.manual_seed(0)
    model = fcmae.create_model(model_name, img_size=size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda" or None)
    imgs = torch.randn(batch_size, 3, size, size, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _, _ = model(imgs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def pretrain_rate(model_name: str, data: Path, out: Path, size: int, batch_size: int, workers: int, steps: int,
                  extra: list[str]) -> float:
    import pretrain

    argv = ["--model", model_name, "--data-path", str(data), "--output-dir", str(out), "--input-size", str(size),
            "--batch-size", str(batch_size), "--num-workers", str(workers), "--max-steps", str(steps),
            "--log-every", "1", "--save-every", str(steps + 1), "--vis-every", "0", "--warmup-steps", "1",
            "--no-progress", *extra]
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
    parser.add_argument("--images", type=int, default=0, help="JPEGs to write (default: steps + 2 batches)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--output", type=Path, help="also write the table here (Markdown)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        configure_cuda()
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else None
    step = step_rate(args.model, args.img_size, args.batch_size, 5, device, dtype)  # first, in a fresh process
    extra = ["--mixed-precision", args.mixed_precision]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        write_imagenet_like(data, args.images or (args.steps + 2) * args.batch_size)
        loader = loader_rate(data, args.img_size, args.batch_size, args.num_workers, batches=args.steps)
        cpu_path = pretrain_rate(args.model, data, Path(tmp) / "cpu", args.img_size, args.batch_size,
                                 args.num_workers, args.steps, extra)
        gpu_path = pretrain_rate(args.model, data, Path(tmp) / "gpu", args.img_size, args.batch_size,
                                 args.num_workers, args.steps, extra + ["--gpu-augment"])
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"{args.model}, {args.img_size} px, batch {args.batch_size}, {args.num_workers} workers, "
             f"precision {args.mixed_precision}, {where}", "",
             "| loader alone, CPU augment (img/s) | training step alone (img/s) | pretrain.py, CPU augment (img/s) "
             "| pretrain.py, --gpu-augment (img/s) |", "|---|---|---|---|",
             f"| {loader:.1f} | {step:.1f} | {cpu_path:.1f} | {gpu_path:.1f} |"]
    print("\n".join(lines))
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
