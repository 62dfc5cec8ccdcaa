"""Does FCMAE pretraining learn? Frozen-feature probes of random-init and pretrained encoders, through the CLI.

The task: which photo does a crop come from? The photos are the real ones that ship inside scikit-image and
scikit-learn (nothing is downloaded). Each photo is one class. Train crops come from the first 2/3 of its longer
side, val crops from the last 1/3, so no val pixel is ever seen in training, neither by the probe nor by
pretraining. Crops vary in size (so in scale) and are saved at 128 px: a 4x4 grid of 32 px patches for FCMAE.

Each row runs the path a user takes:
  python pretrain.py --data-path DATA ...           (unlabeled: train/ only; one run per init, of the longest
                                                     length, its checkpoints probed at the shorter ones)
  python -m fcmae.convert fcmae_model.safetensors timm.safetensors --to timm
  timm.create_model(..., pretrained_cfg_overlay=dict(file=timm.safetensors)) -> global-average-pooled stage-4
  features -> standardized with the train statistics -> logistic regression (linear probe, its C chosen by
  3-fold cross-validation on train) and kNN (k=20, cosine) on val/.

    nice python benchmarks/probe.py                    # the table in benchmarks/README.md (< 20 min on 2 cores)
    nice python benchmarks/probe.py --quick            # timm init, steps 50 + 150, no raw-pixel row (see README)
    python benchmarks/probe.py --steps 2000 8000 --device cuda   # longer rows on a GPU
    nice python benchmarks/probe.py --quick --mask-ratios 0.4 0.6 0.75   # one pretraining run per mask ratio
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import timm
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.preprocessing import StandardScaler

import fcmae
from fcmae.data import demo_image_files, eval_transform, find_labeled_images, load_rgb
from fcmae.knn_monitor import knn_accuracy

ROOT = Path(__file__).resolve().parents[1]
CROP = 128  # saved crop size: 16 patches of 32 px
SHORT_SIDE = 320  # every photo is first resized to this shorter side, so crop sizes mean the same everywhere
CROP_SIDES = (64, 128)  # crop side range at that scale, before resizing to CROP
VAL_FRACTION = 1 / 3
LEAVE_OUT = {"motorcycle_right.png"}  # the other view of motorcycle_left: one scene, one class


def photo_files() -> list[Path]:
    """scikit-image's demo photos plus scikit-learn's two sample photos (all inside the installed wheels)."""
    import sklearn.datasets

    files = [f for f in demo_image_files() if f.name not in LEAVE_OUT]
    sk = Path(sklearn.datasets.__file__).parent / "images"
    return files + sorted(sk.glob("*.jpg"))


def write_crops(root: Path, train_per_photo: int, val_per_photo: int, seed: int = 0) -> Path:
    """root/train/<photo>/*.png and root/val/<photo>/*.png (written once; reused if root/val exists)."""
    if (root / "val").is_dir():
        return root
    tmp = root.with_name(root.name + ".tmp")
    for index, path in enumerate(photo_files()):
        img = load_rgb(path)
        scale = SHORT_SIDE / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        arr = np.asarray(img)
        if img.width < img.height:  # split along the longer side
            arr = arr.transpose(1, 0, 2)
        long = arr.shape[1]
        cut = round(long * (1 - VAL_FRACTION))
        for split, (lo, hi), count in (("train", (0, cut), train_per_photo), ("val", (cut, long), val_per_photo)):
            rng = np.random.default_rng([seed, index, split == "val"])  # more val crops leave train as it was
            folder = tmp / split / path.stem
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                side = int(rng.integers(CROP_SIDES[0], min(CROP_SIDES[1], hi - lo) + 1))
                x = int(rng.integers(lo, hi - side + 1))
                y = int(rng.integers(0, arr.shape[0] - side + 1))
                crop = Image.fromarray(np.ascontiguousarray(arr[y:y + side, x:x + side]))
                crop.resize((CROP, CROP), Image.Resampling.BICUBIC).save(folder / f"{i:03d}.png")
    tmp.replace(root)
    return root


# The CLI path ---------------------------------------------------------------------------------------------------


def run(cmd: list[str], log: Path) -> None:
    """Run a project command; its output goes to `log`, and a failure stops the benchmark with its tail."""
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({log}):\n" + "\n".join(tail))


def pretrain(data: Path, out: Path, init: str, lengths: Sequence[int], args: argparse.Namespace) -> dict[int, Path]:
    """One pretrain.py run on data/train of max(lengths) steps, saving its training state at every length.

    Returns {length: model file}: the checkpoint's model at each shorter length, the run's fcmae_model.safetensors
    at the last. One run with checkpoints instead of a run per length: the shorter rows cost no extra steps (the
    full benchmark fits its time budget), at the price of a learning rate not yet annealed at the shorter points.
    """
    steps, every = max(lengths), math.gcd(*lengths)
    if not (out / "fcmae_model.safetensors").is_file():
        run([sys.executable, "pretrain.py", "--data-path", str(data), "--output-dir", str(out), "--model",
             args.model, "--input-size", str(CROP), "--batch-size", str(args.batch_size), "--max-steps", str(steps),
             "--warmup-steps", str(max(steps // 10, 1)), "--lr", str(args.lr), "--mask-ratio", str(args.mask_ratio),
             "--decoder-embed-dim", str(args.decoder_embed_dim), "--init", init,
             "--norm-pix-loss" if args.norm_pix_loss else "--no-norm-pix-loss", "--seed", str(args.seed),
             "--num-workers", str(args.num_workers), "--save-every", str(every), "--keep-last", str(steps // every),
             "--log-every", str(math.gcd(every, 25))],
            out.with_name(out.name + ".log"))  # not with_suffix: "...-mask0.4" has a "suffix" too
    return {n: out / "fcmae_model.safetensors" if n == steps else out / "checkpoints" / f"step_{n:08d}" /
            "model.safetensors" for n in lengths}


def random_model(out: Path, init: str, seed: int, model: str) -> Path:
    """A freshly initialized FCMAE model file, as pretrain.py would start from it."""
    path = out / "fcmae_model.safetensors"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        fcmae.save_model(fcmae.create_model(model, img_size=CROP, init=init), path)
    return path


def convert(model_file: Path) -> Path:
    """python -m fcmae.convert FILE timm.safetensors --to timm."""
    out = model_file.with_name("timm.safetensors")
    if not out.is_file():
        run([sys.executable, "-m", "fcmae.convert", str(model_file), str(out), "--to", "timm"],
            model_file.with_name("convert.log"))
    return out


# Features and probes --------------------------------------------------------------------------------------------


def load_split(data: Path, split: str) -> tuple[torch.Tensor, np.ndarray]:
    """(N, 3, 128, 128) normalized images and labels of one split."""
    files, labels, _ = find_labeled_images(data / split)
    tf = eval_transform((CROP, CROP), crop_pct=1.0)
    return torch.stack([tf(load_rgb(f)) for f in files]), np.asarray(labels)


@torch.no_grad()
def features(timm_file: Path, model: str, images: torch.Tensor, device: str) -> np.ndarray:
    """Global-average-pooled stage-4 features (N, C) of the converted timm model."""
    net = timm.create_model(model, pretrained=True, num_classes=0,
                            pretrained_cfg_overlay=dict(file=str(timm_file))).to(device).eval()
    out = [net.forward_features(batch.to(device)).mean((2, 3)).cpu() for batch in images.split(64)]
    return torch.cat(out).double().numpy()


PROBE_C = (0.01, 0.1, 1.0)  # inverse L2 strengths of the linear probe, one picked per row by CV on train


def probe(train: np.ndarray, y_train: np.ndarray, val: np.ndarray, y_val: np.ndarray) -> dict[str, float]:
    """Val accuracy (%) of a logistic-regression probe and of kNN (k=20, cosine) on standardized features.

    The probe's regularization is chosen per feature set by 3-fold cross-validation on the train crops only (val
    never picks it): features of different scale and rank want different C, and one fixed C favours some rows.
    The kNN is the library's (`fcmae.knn_monitor.knn_accuracy`), the one `pretrain.py --monitor-data` logs.
    """
    knn = knn_accuracy(torch.from_numpy(train), torch.from_numpy(y_train), torch.from_numpy(val),
                       torch.from_numpy(y_val))  # standardizes with the train statistics itself
    scaler = StandardScaler().fit(train)
    train, val = scaler.transform(train), scaler.transform(val)
    folds = StratifiedKFold(n_splits=min(3, np.bincount(y_train).min()), shuffle=True, random_state=0)
    linear = GridSearchCV(LogisticRegression(max_iter=1000), {"C": list(PROBE_C)}, cv=folds,
                          n_jobs=-1).fit(train, y_train)  # the nine CV fits on all cores: half the probe's time
    return {"linear": 100 * linear.score(val, y_val), "knn": knn, "C": linear.best_params_["C"]}


def raw_pixels(images: torch.Tensor, size: int = 16) -> np.ndarray:
    """Images downsampled to size x size, flattened: the baseline any encoder has to beat.

    16 x 16 (768 features), not 32 x 32: on this task it probes as well or better (45.1 vs 44.2 linear at the best C)
    and its logistic fits take a quarter of the time (about 8 s instead of 30 s each, ten per CV search).
    """
    return torch.nn.functional.adaptive_avg_pool2d(images, size).flatten(1).double().numpy()


# Main -----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="timm init only, 50 + 150 steps, no raw-pixel baseline (its fits are the slowest part)")
    parser.add_argument("--steps", type=int, nargs="+", help="pretraining lengths (default: 150 450; quick: 50 150)")
    parser.add_argument("--inits", nargs="+", choices=["timm", "official"],
                        help="default: both; quick or a mask-ratio sweep: timm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--model", default="convnextv2_atto")
    parser.add_argument("--batch-size", type=int, default=32)
    # 3e-4, not 1.5e-3: at 1.5e-3 AdamW overwrites the std-0.02 init within a few dozen steps and the features fell
    # below random ones (benchmarks/README.md)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--mask-ratios", type=float, nargs="+", default=[0.6],
                        help="one pretraining run per ratio (per init and seed), all probed at every length")
    parser.add_argument("--decoder-embed-dim", type=int, default=256)
    # plain pixel loss: norm-pix normalizes away each patch's colour and brightness, the cue between these photos
    parser.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--train-per-photo", type=int, default=48)
    parser.add_argument("--val-per-photo", type=int, default=48)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "output" / "probe")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    check_args(parser, args)
    args.seed = 0
    steps = args.steps or ((50, 150) if args.quick else (150, 450))
    sweep = args.mask_ratios != [0.6]  # rows and run folders name their ratio; 0.6 alone keeps the old names
    args.inits = args.inits or (["timm"] if args.quick or sweep else ["timm", "official"])
    args.out.mkdir(parents=True, exist_ok=True)
    data = write_crops(args.out / "data", args.train_per_photo, args.val_per_photo)
    train_x, y_train = load_split(data, "train")
    val_x, y_val = load_split(data, "val")
    print(f"{len(set(y_train))} photos: {len(y_train)} train / {len(y_val)} val crops of {CROP} px in {data}")

    rows = []
    if not args.quick:  # the slowest probe of all (about a minute and a half of logistic fits)
        rows.append({"features": "raw pixels (16x16)", **probe(raw_pixels(train_x), y_train, raw_pixels(val_x), y_val)})
        print(f"{rows[0]['features']:40s} linear {rows[0]['linear']:5.1f}  kNN {rows[0]['knn']:5.1f}")
    for seed in args.seeds:
        args.seed = seed
        for init in args.inits:
            # the random model is the same for every mask ratio (the ratio only enters pretraining): one row
            models = {(None, 0): random_model(args.out / f"{args.model}-{init}-0-seed{seed}", init, seed, args.model)}
            pretrain_seconds = {}
            for ratio in args.mask_ratios:
                args.mask_ratio = ratio
                # 0.6's folder keeps its old name, so a sweep reuses a default run of the same length
                run_dir = args.out / f"{args.model}-{init}-{max(steps)}-seed{seed}{f'-mask{ratio:g}' * (ratio != 0.6)}"
                start = time.perf_counter()
                models.update({(ratio, n): file for n, file in pretrain(data, run_dir, init, steps, args).items()})
                pretrain_seconds[ratio] = round(time.perf_counter() - start, 1)
            for (ratio, length), model_file in models.items():
                start = time.perf_counter()
                timm_file = convert(model_file)
                row = {"features": f"{init} init, " + (f"mask {ratio:g}, " if sweep and length else "")
                       + (f"step {length} of {max(steps)}" if length else "random"),
                       "init": init, "steps": length, "seed": seed, "mask_ratio": ratio if length else None}
                row.update(probe(features(timm_file, args.model, train_x, args.device), y_train,
                                 features(timm_file, args.model, val_x, args.device), y_val))
                if length:
                    row["loss"] = loss_at(model_file_run(model_file) / "metrics.jsonl", length)
                    row["pretrain_seconds"] = pretrain_seconds[ratio]  # the whole run's, shared by its rows
                row["seconds"] = round(time.perf_counter() - start, 1)  # convert, features and probes
                rows.append(row)
                if args.json:  # after every row: a run stopped part-way keeps what it measured
                    args.json.write_text(json.dumps(rows, indent=1))
                print(f"{row['features'] + f' (seed {seed})':40s} linear {row['linear']:5.1f}  kNN {row['knn']:5.1f}"
                      + (f"  loss {row['loss']:.3f}" if "loss" in row else "") + f"  {row['seconds']:.0f} s")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors (exit 2) for settings that would otherwise fail minutes in, after pretraining."""
    def error(message: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    if args.steps and min(args.steps) < 1:
        error(f"--steps must be at least 1, got {min(args.steps)}")
    bad = [r for r in args.mask_ratios if not 0 < r < 1]
    if bad:
        error(f"--mask-ratios must lie strictly between 0 and 1, got {bad[0]:g}")
    if len(set(args.mask_ratios)) < len(args.mask_ratios):
        error(f"--mask-ratios lists a ratio twice: {' '.join(f'{r:g}' for r in args.mask_ratios)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        error(f"--device {args.device}: no CUDA device is visible to torch {torch.__version__}")


def model_file_run(model_file: Path) -> Path:
    """The pretrain.py output folder a model file belongs to (its own folder, or the one above checkpoints/)."""
    return model_file.parents[2] if model_file.parent.parent.name == "checkpoints" else model_file.parent


def loss_at(metrics: Path, step: int) -> float:
    """The logged training loss at `step` (pretrain.py logs every gcd(lengths, 25) steps here)."""
    return next(r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if r.get("step") == step)


def print_table(rows: list[dict]) -> None:
    """The markdown table of benchmarks/README.md: one line per (features, seed)."""
    print("\n| features | seed | linear probe | probe C | kNN-20 | final loss |\n|---|---|---|---|---|---|")
    for row in rows:
        loss = f"{row['loss']:.3f}" if "loss" in row else ""
        print(f"| {row['features']} | {row.get('seed', '')} | {row['linear']:.1f} | {row['C']:g} | {row['knn']:.1f} "
              f"| {loss} |")


if __name__ == "__main__":
    main()
