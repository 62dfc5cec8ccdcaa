"""What does the kNN monitor (pretrain.py --monitor-data) cost against the training it watches?

One pretrain.py run on probe.py's photo crops (train/ as the unlabeled data, train/ + val/ as the monitor set),
logging every step. From its metrics.jsonl:
  monitor s / image   knn_seconds / monitor images, averaged over the evaluations
  train s / image     1 / images_per_s of the steps whose window holds no evaluation nor the first steps
  ratio               the two divided: what one monitor image costs in training images
  at the default      ratio x monitor images / (1000 x batch): the share of the run at --monitor-every 1000

    nice python benchmarks/monitor_cost.py                          # atto, 128 px, batch 32, 1632 monitor images
    python benchmarks/monitor_cost.py --input-size 64 --per-photo 8 --steps 12 --every 4   # a quick one
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_probe():
    spec = importlib.util.spec_from_file_location("probe", ROOT / "benchmarks" / "probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="convnextv2_atto")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-photo", type=int, default=48, help="train and val crops per photo (17 photos)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10, help="--monitor-every of the measured run")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "output" / "monitor_cost")
    args = parser.parse_args(argv)
    probe = load_probe()
    data = probe.write_crops(args.out / f"data-{args.per_photo}", args.per_photo, args.per_photo)
    run_dir = args.out / f"run-{args.model}-{args.input_size}-{args.batch_size}-{args.per_photo}-{args.steps}"
    if not (run_dir / "fcmae_model.safetensors").is_file():
        probe.run([sys.executable, "pretrain.py", "--data-path", str(data), "--output-dir", str(run_dir), "--model",
                   args.model, "--input-size", str(args.input_size), "--batch-size", str(args.batch_size),
                   "--max-steps", str(args.steps), "--warmup-steps", "1", "--lr", "3e-4", "--decoder-embed-dim", "256",
                   "--num-workers", str(args.num_workers), "--log-every", "1", "--vis-every", "0", "--save-every",
                   str(args.steps), "--monitor-data", str(data), "--monitor-every", str(args.every), "--no-progress"],
                  run_dir.with_suffix(".log"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    monitored = {r["step"] for r in records if "knn_top1" in r}
    images = sum(1 for _ in (data / "train").rglob("*.png")) + sum(1 for _ in (data / "val").rglob("*.png"))
    monitor = statistics.mean(r["knn_seconds"] for r in records if "knn_top1" in r) / images
    # a step's window starts after the previous step's callbacks: the step after an evaluation holds it
    train = statistics.median(1 / r["images_per_s"] for r in records
                              if "loss" in r and r["step"] > 2 and r["step"] - 1 not in monitored)
    ratio = monitor / train
    result = {"model": args.model, "input_size": args.input_size, "batch_size": args.batch_size,
              "monitor_images": images, "monitor_s_per_image": round(monitor, 4),
              "train_s_per_image": round(train, 4), "ratio": round(ratio, 3),
              "share_at_every_1000": round(ratio * images / (1000 * args.batch_size), 4),
              "knn_top1": [r["knn_top1"] for r in records if "knn_top1" in r]}
    print(json.dumps(result))
    print(f"one monitor image costs {ratio:.2f} training images; {images} monitor images every 1000 steps of "
          f"batch {args.batch_size}: {100 * result['share_at_every_1000']:.2f}% of the run")
    return result


if __name__ == "__main__":
    main()
