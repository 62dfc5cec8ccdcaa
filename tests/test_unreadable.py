"""Unreadable images met in DataLoader workers: one plain stderr line per file and run, however many workers,
epochs and evaluation passes meet it (issue 24 item 10; pretraining: tests/test_training.py). Each run is a
process of its own: pytest records what the workers it forks print instead of showing it."""

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import launcher_failure, write_photos

ROOT = Path(__file__).resolve().parent.parent
FINETUNE = ["--model", "atto", "--input-size", "64", "--batch-size", "2", "--num-workers", "2", "--epochs", "2",
            "--lr", "1e-3", "--warmup-epochs", "0", "--drop-path", "0", "--mixup", "0", "--cutmix", "0", "--reprob",
            "0", "--aa", "", "--model-ema", "--model-ema-eval", "--no-progress", "--log-every", "1"]


def warned(stderr: str) -> list[str]:
    """The paths of the `warning: skipped unreadable image PATH: REASON` lines, each with a reason, in order."""
    return re.findall(r"^warning: skipped unreadable image (\S+): \S.*$", stderr, re.MULTILINE)


def run_script(script: str | list[str], args: list[str]) -> subprocess.CompletedProcess:
    """A script of the repository (or a launcher command before it) in a process of its own."""
    command = [str(ROOT / script)] if isinstance(script, str) else script
    result = subprocess.run([sys.executable, *command, *args], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, launcher_failure(result.stderr)
    return result


def cut(photo: Path, to: Path) -> Path:
    """A real photo cut in half: a truncated file, as an interrupted copy leaves it."""
    data = photo.read_bytes()
    to.write_bytes(data[: len(data) // 2])
    return to


def test_finetune_warns_once_per_file_and_says_what_accuracy_counts(tmp_path):
    """Two workers, two epochs, raw and EMA evaluation (four val passes): each bad file is named once, in one
    plain line (no Python warning with a source file and line), and the accuracy line says it counts 5 of 6."""
    data = tmp_path / "data"
    for split, count in (("train", 4), ("val", 3)):
        for label in ("a", "b"):
            write_photos(data / split / label, count, size=72)
    bad_train = cut(sorted((data / "train" / "a").rglob("*.png"))[0], data / "train" / "a" / "cut.png")
    (data / "train" / "b" / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(600))
    bad_val = cut(sorted((data / "val" / "b").rglob("*.jpg"))[0], data / "val" / "b" / "cut.jpg")
    (data / "val" / "b" / "photo_002.png").unlink()  # 3 + 3 val files, one of them unreadable
    result = run_script("finetune.py", [*FINETUNE, "--data-path", str(data), "--output-dir", str(tmp_path / "ft")])
    err = result.stderr
    assert sorted(warned(err)) == sorted(str(f) for f in (bad_train, data / "train" / "b" / "garbage.jpg", bad_val))
    assert "UserWarning" not in err and "datasets.py" not in err and "warnings.warn" not in err, err
    out = result.stdout + err
    assert "10 train / 6 val images" in out
    epochs = re.findall(r"^epoch \d+: .*$", out, re.MULTILINE)
    assert len(epochs) == 2 and all(e.endswith(", top-1 over 5 of 6 val images (1 unreadable)") for e in epochs), out

    # Two processes, each with workers: the file is named once, by the main process, and counted once.
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "finetune.py")]
    evaluated = run_script(launch, ["--eval", "--resume", str(tmp_path / "ft" / "classifier.safetensors"),
                                    "--data-path", str(data), "--num-workers", "1", "--batch-size", "2"])
    assert warned(evaluated.stderr) == [str(bad_val)], evaluated.stderr[-3000:]
    assert "on 5 of 6 images (1 unreadable)" in evaluated.stdout

