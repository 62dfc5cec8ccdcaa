"""Does FCMAE pretraining help fine-tuning? Few labels, real photos, the user's CLI path, against a random init.

The task is benchmarks/probe.py's: which photo does a 128 px crop come from (17 photos that ship inside
scikit-image and scikit-learn; val crops from a part of each photo that training never sees). Pretraining gets all
816 train crops without labels; fine-tuning gets only a few labelled crops per photo (10: 170 images); val is 408
crops (24 per photo: the first half of the probe's). Every number comes from the commands a user runs:

  python pretrain.py --config configs/pretrain/photos_demo.yaml --data-path CROPS --output-dir PRE
  python -m fcmae.convert PRE/fcmae_model.safetensors PRE/timm.safetensors --to timm
  python finetune.py --config configs/finetune/photos_demo.yaml --data-path LABELED --seed S \
      --finetune PRE/timm.safetensors --output-dir FT          # from the FCMAE weights
  python finetune.py --config configs/finetune/photos_demo.yaml --data-path LABELED --seed S \
      --finetune "" --output-dir FT_RANDOM                     # the same recipe and budget from a random init

Seed S draws the labelled crops and seeds the fine-tune (head init, random init, data order, augmentation); the
pretraining is one run (seed 0) shared by all seeds. Top-1 is the last epoch's (the val set picks nothing); the
best epoch's is shown beside it.

    OMP_NUM_THREADS=1 nice python benchmarks/finetune_gain.py     # the table in benchmarks/README.md
    python benchmarks/finetune_gain.py --quick                     # a smoke size: checks the path, not the gain
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe import write_crops  # noqa: E402  (the probe's crops: the same photos, split and sizes)

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = "configs/pretrain/photos_demo.yaml"
FINETUNE_CONFIG = "configs/finetune/photos_demo.yaml"
INITS = ("fcmae", "random")


def labeled_subset(crops: Path, out: Path, per_class: int, seed: int) -> Path:
    """out/train/<photo>/: `per_class` train crops of each photo drawn with `seed`; out/val -> crops/val.

    Written once (reused if out/val exists). The labelled crops are a subset of the crops pretraining saw unlabeled.
    """
    if (out / "val").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for folder in sorted(p for p in (crops / "train").iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.png"))
        if len(files) < per_class:
            raise ValueError(f"{folder} has {len(files)} crops, fewer than --labels-per-class {per_class}")
        (tmp / "train" / folder.name).mkdir(parents=True)
        for i in sorted(rng.choice(len(files), per_class, replace=False)):
            shutil.copyfile(files[i], tmp / "train" / folder.name / files[i].name)
    (tmp / "val").symlink_to(os.path.relpath(crops / "val", tmp))
    tmp.replace(out)
    return out


class Runner:
    """Runs project commands from the repository root, logging each and adding up their wall and CPU time."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.seconds: dict[str, list[float]] = {}  # stage -> [wall, CPU] seconds

    def __call__(self, stage: str, cmd: list[str], log: Path) -> None:
        self.commands.append(" ".join(shlex.quote(c) for c in cmd))
        print(f"$ {self.commands[-1]}", flush=True)
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        with open(log, "w") as f:
            done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its DataLoader workers
        wall_cpu = self.seconds.setdefault(stage, [0.0, 0.0])
        wall_cpu[0] += time.perf_counter() - start
        wall_cpu[1] += (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if done.returncode:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise RuntimeError(f"{self.commands[-1]} failed (exit {done.returncode}, {log}):\n{tail}")


def epochs_of(metrics: Path) -> list[dict]:
    """finetune.py's per-epoch records (those with val_acc1)."""
    if not metrics.is_file():
        return []
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if "val_acc1" in r]


def finished_run(out: Path, settings: dict) -> bool:
    """Whether `out` holds a finished finetune.py run with these settings (its config.yaml has them all)."""
    if not (out / "classifier.safetensors").is_file() or not (out / "config.yaml").is_file():
        return False
    saved = yaml.safe_load((out / "config.yaml").read_text())
    records = epochs_of(out / "metrics.jsonl")
    return all(saved.get(key) == value for key, value in settings.items()) and bool(records) and (
        round(records[-1]["epoch"]) + 1 == saved["epochs"])


def finetune(runner: Runner, data: Path, start: str, out: Path, seed: int, args: argparse.Namespace) -> list[dict]:
    """One finetune.py run with the demo's recipe (reused if `out` holds a finished run with the same settings:
    the config file's, the seed, the data, the start and the length); its per-epoch records."""
    extra = ["--epochs", str(args.epochs)] if args.epochs else []
    settings = {**yaml.safe_load((ROOT / FINETUNE_CONFIG).read_text()), "data_path": str(data), "finetune": start,
                "output_dir": str(out), "seed": seed, **({"epochs": args.epochs} if args.epochs else {})}
    del settings["num_workers"]  # does not change the result
    if finished_run(out, settings):
        return epochs_of(out / "metrics.jsonl")
    shutil.rmtree(out, ignore_errors=True)  # a run stopped part-way starts again: the table is of whole runs
    out.parent.mkdir(parents=True, exist_ok=True)
    runner(f"finetune ({'FCMAE' if start else 'random init'})",
           [sys.executable, "finetune.py", "--config", FINETUNE_CONFIG, "--data-path", str(data), "--finetune", start,
            "--output-dir", str(out), "--seed", str(seed), "--num-workers", str(args.num_workers), "--no-progress",
            *extra], out.with_suffix(".log"))
    return epochs_of(out / "metrics.jsonl")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke size: 4 train / 2 val crops per photo, 4 pretraining steps, 2 labels per "
                             "photo, 1 epoch (checks the path, not the gain)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--labels-per-class", type=int, help="labelled train crops per photo (default 10; quick 2)")
    parser.add_argument("--train-per-photo", type=int, help="unlabeled train crops per photo (default 48; quick 4)")
    parser.add_argument("--val-per-photo", type=int, help="val crops per photo (default 24; quick 2)")
    parser.add_argument("--pretrain-steps", type=int, help="default: the pretrain config's (450); quick 4")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs; default: the finetune config's (20); quick 1")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "output" / "finetune-gain")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    quick = dict(labels_per_class=2, train_per_photo=4, val_per_photo=2, pretrain_steps=4, epochs=1)
    full = dict(labels_per_class=10, train_per_photo=48, val_per_photo=24, pretrain_steps=None, epochs=None)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    def error(message: str) -> None:  # one line, exit 2, before anything is written
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    for key in ("labels_per_class", "train_per_photo", "val_per_photo", "pretrain_steps", "epochs"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.labels_per_class > args.train_per_photo:
        error(f"--labels-per-class {args.labels_per_class} exceeds --train-per-photo {args.train_per_photo}")

    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner()
    start = time.perf_counter()
    crops = write_crops(args.out / f"crops-{args.train_per_photo}-{args.val_per_photo}", args.train_per_photo,
                        args.val_per_photo)

    # Pretraining: one run on every train crop, labels unused; then the conversion a user makes for timm.
    steps = f"{args.pretrain_steps}steps" if args.pretrain_steps else "config"
    pre = args.out / f"pretrain-{args.train_per_photo}crops-{steps}"
    if not (pre / "fcmae_model.safetensors").is_file():
        shutil.rmtree(pre, ignore_errors=True)
        runner("pretrain", [sys.executable, "pretrain.py", "--config", PRETRAIN_CONFIG, "--data-path", str(crops),
                            "--output-dir", str(pre), "--num-workers", str(args.num_workers), "--no-progress",
                            *(["--max-steps", str(args.pretrain_steps), "--warmup-steps",
                               str(max(args.pretrain_steps // 10, 1)), "--save-every", str(args.pretrain_steps)]
                              if args.pretrain_steps else [])], pre.with_suffix(".log"))
    timm_file = pre / "timm.safetensors"
    if not timm_file.is_file():
        runner("convert", [sys.executable, "-m", "fcmae.convert", str(pre / "fcmae_model.safetensors"), str(timm_file),
                           "--to", "timm"], pre.with_name(pre.name + "-convert.log"))

    rows = []
    for seed in args.seeds:
        data = labeled_subset(crops, args.out / f"labeled-{args.train_per_photo}-{args.val_per_photo}-"
                                                f"{args.labels_per_class}-seed{seed}", args.labels_per_class, seed)
        row = {"seed": seed, "labels_per_class": args.labels_per_class,
               "train_images": len(list((data / "train").rglob("*.png"))),
               "val_images": len(list((data / "val").rglob("*.png")))}
        for init, weights in zip(INITS, (str(timm_file), "")):
            out = args.out / f"ft-{data.name}-{init}{f'-{pre.name}' * bool(weights)}-{args.epochs or 'config'}ep"
            records = finetune(runner, data, weights, out, seed, args)
            row[init] = records[-1]["val_acc1"]
            row[f"{init}_best"] = max(r["val_acc1"] for r in records)
        row["gain"] = row["fcmae"] - row["random"]
        rows.append(row)
        print(f"seed {seed}: from FCMAE {row['fcmae']:.1f}, from random init {row['random']:.1f}, "
              f"gain {row['gain']:+.1f}", flush=True)
        if args.json:  # after every seed: a run stopped part-way keeps what it measured
            args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows, runner, time.perf_counter() - start)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


def print_table(rows: list[dict], runner: Runner, wall: float) -> None:
    """The markdown table of benchmarks/README.md, then the commands run and the time per stage."""
    print("\n| seed | labelled crops | from FCMAE, top-1 (best epoch) | from random init, top-1 (best epoch) | gain |\n"
          "|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['seed']} | {row['train_images']} | **{row['fcmae']:.1f}** ({row['fcmae_best']:.1f}) "
              f"| {row['random']:.1f} ({row['random_best']:.1f}) | **{row['gain']:+.1f}** |")
    if len(rows) > 1:
        mean = {key: float(np.mean([r[key] for r in rows])) for key in ("fcmae", "random", "gain")}
        print(f"| mean | | {mean['fcmae']:.1f} | {mean['random']:.1f} | {mean['gain']:+.1f} |")
    print("\ntime (wall / CPU, run here now; a reused run counts 0):")
    for stage, (seconds, cpu) in runner.seconds.items():
        print(f"  {stage}: {seconds / 60:.1f} / {cpu / 60:.1f} min")
    print(f"  total: {wall / 60:.1f} min wall, "
          f"{sum(cpu for _, cpu in runner.seconds.values()) / 60:.1f} CPU-min in the commands")


if __name__ == "__main__":
    main()
