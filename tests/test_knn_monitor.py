"""The kNN monitor (pretrain.py --monitor-data): benchmarks/probe.py's kNN, on real photo crops, in a real run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from accelerate.state import AcceleratorState
from helpers import SMALL, launcher_failure, randomize_
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fcmae
from fcmae.cli import run_cli
from fcmae.data import eval_transform, find_labeled_images, load_rgb
from fcmae.knn_monitor import KNNMonitor, knn_accuracy, pooled_features
from fcmae.training import Run

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import pretrain  # noqa: E402

SIZE = 64
RUN = ["--model", "atto", "--input-size", str(SIZE), "--batch-size", "8", "--decoder-embed-dim", "64",
       "--num-workers", "0", "--lr", "3e-4", "--warmup-steps", "1", "--log-every", "1", "--vis-every", "0",
       "--no-progress"]


@pytest.fixture(scope="module")
def crops(probe, tmp_path_factory):
    """probe.py's crops of 17 real photos (a class each): 4 train and 3 val crops per photo, from disjoint regions."""
    return probe.write_crops(tmp_path_factory.mktemp("monitor") / "crops", train_per_photo=4, val_per_photo=3)


def sklearn_knn(train, y_train, val, y_val) -> float:
    """The probe's kNN as benchmarks/probe.py computed it before it imported knn_accuracy: scikit-learn's."""
    scaler = StandardScaler().fit(train)
    knn = KNeighborsClassifier(n_neighbors=min(20, len(y_train)), metric="cosine").fit(scaler.transform(train), y_train)
    return 100 * knn.score(scaler.transform(val), y_val)


def call(argv):
    try:
        return run_cli(pretrain.main, argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# knn_accuracy against scikit-learn ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4, 20])
def test_knn_accuracy_is_sklearns_standardized_cosine_knn(k):
    """Real features (the 8x8 digit scans as 64 pixels), a constant pixel (std 0), even k (tied votes)."""
    digits = load_digits()
    x, y = digits.data, digits.target
    assert (x.std(0) == 0).any()  # the corner pixels are always blank: StandardScaler's zero-scale rule is used
    noisy = x + np.random.default_rng(0).normal(scale=4.0, size=x.shape)  # harder: not 99%
    for train, val in ((slice(0, 300), slice(300, 700)), (slice(700, 760), slice(760, 1797))):
        scaler = StandardScaler().fit(noisy[train])
        knn = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(scaler.transform(noisy[train]), y[train])
        expected = 100 * knn.score(scaler.transform(noisy[val]), y[val])
        got = knn_accuracy(torch.tensor(noisy[train]), torch.tensor(y[train]), torch.tensor(noisy[val]),
                           torch.tensor(y[val]), k=k)
        assert got == pytest.approx(expected, abs=1e-9)
        assert 30 < got < 100  # well above chance (10%), below perfect
    shuffled = knn_accuracy(torch.tensor(x[:900]), torch.tensor(np.random.default_rng(1).permutation(y[:900])),
                            torch.tensor(x[900:]), torch.tensor(y[900:]))
    assert shuffled < 20  # labels that carry nothing: near chance (10%)


def test_pooled_features_are_the_dense_encoders_pooled_last_stage():
    model = randomize_(fcmae.create_model("atto", img_size=SIZE, backend="sparse", **SMALL)).eval()
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model.encoder(images).mean((2, 3))  # the sparse backend, every patch visible
    torch.testing.assert_close(pooled_features(model.encoder, images), expected, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 run's monitor still computes in float32
        torch.testing.assert_close(pooled_features(model.encoder, images), expected, rtol=1e-4, atol=1e-5)


# The monitor against benchmarks/probe.py, and in runs ----------------------------------------------------------


def probe_knn(probe, crops: Path, model_file: Path) -> tuple[float, float]:
    """benchmarks/probe.py's path on a model file: fcmae.convert to timm, timm's pooled features of the crops at
    SIZE px, its kNN (now knn_accuracy) and scikit-learn's on the same features. Also checks that the monitor's
    features of the model are timm's."""
    timm_file = probe.convert(model_file)
    tf = eval_transform((SIZE, SIZE), crop_pct=1.0)
    split = {}
    for name in ("train", "val"):
        files, labels, _ = find_labeled_images(crops / name)
        images = torch.stack([tf(load_rgb(f)) for f in files])
        split[name] = probe.features(timm_file, "convnextv2_atto", images, "cpu"), np.asarray(labels)
    (train, y_train), (val, y_val) = split["train"], split["val"]
    monitor = KNNMonitor(crops, (SIZE, SIZE))
    ours = monitor.features(fcmae.load_model(model_file).encoder, SimpleNamespace(device=torch.device("cpu")))
    np.testing.assert_allclose(ours.double().numpy(), np.concatenate([train, val]), rtol=1e-4, atol=1e-5)
    return probe.probe(train, y_train, val, y_val)["knn"], sklearn_knn(train, y_train, val, y_val)


def test_a_pretraining_run_logs_the_knn_that_probe_py_computes(probe, crops, tmp_path):
    """A real pretrain.py run with --monitor-data: knn_top1 in metrics.jsonl every 2 steps and at the last one,
    equal to probe.py's kNN (fcmae.convert -> timm -> pooled features -> kNN) on the run's saved model."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *RUN, "--data-path", str(crops),
                             "--output-dir", str(out), "--max-steps", "3", "--monitor-data", str(crops),
                             "--monitor-every", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kNN monitor: 68 train / 51 val images of 17 classes" in result.stdout
    knn = [r for r in records(out) if "knn_top1" in r]
    assert [r["step"] for r in knn] == [2, 3]
    assert all(r["knn_seconds"] > 0 and set(r) == {"step", "knn_top1", "knn_seconds"} for r in knn)
    assert all(0 <= r["knn_top1"] <= 100 for r in knn)
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3]  # the loss records are as before
    ours, sklearns = probe_knn(probe, crops, out / "fcmae_model.safetensors")  # the weights of step 3
    assert knn[-1]["knn_top1"] == pytest.approx(ours, abs=1e-9) == pytest.approx(sklearns, abs=1e-9)
    assert knn[-1]["knn_top1"] > 100 / 17  # above chance on real photos
    assert f"step 3: knn_top1 {knn[-1]['knn_top1']:.2f}" in result.stdout


@pytest.mark.slow  # three pretraining runs with the monitor
def test_the_monitor_changes_no_loss_and_exact_resume_stays_exact(crops, tmp_path, monkeypatch):
    """The monitor reads the weights only (its loading draws nothing from the global RNG, which seeds the model's
    initialization): a run with it has the losses and weights of a run without, to the bit, and so does a run
    stopped after its step-3 checkpoint and resumed, whose knn_top1 records are the uninterrupted run's (and
    the tracker's, TensorBoard here)."""
    common = RUN + ["--data-path", str(crops), "--max-steps", "6", "--save-every", "3", "--seed", "3"]
    monitored = common + ["--monitor-data", str(crops), "--monitor-every", "2"]
    assert call(common + ["--output-dir", str(tmp_path / "plain")]) == 0
    assert call(monitored + ["--output-dir", str(tmp_path / "straight"), "--log-with", "tensorboard"]) == 0
    interrupted = tmp_path / "interrupted"
    original_save = Run.save_checkpoint

    def save_then_crash(self, on_save=None):
        path = original_save(self, on_save)
        if self.step == 3:
            raise KeyboardInterrupt  # preempted right after the step-3 checkpoint, mid-epoch (8 steps an epoch)
        return path

    monkeypatch.setattr(Run, "save_checkpoint", save_then_crash)
    assert call(monitored + ["--output-dir", str(interrupted)]) == 130
    monkeypatch.setattr(Run, "save_checkpoint", original_save)
    assert call(monitored + ["--output-dir", str(interrupted), "--resume", "auto"]) == 0

    def losses(out):
        return [(r["step"], r["loss"]) for r in records(out) if "loss" in r]

    assert len(losses(tmp_path / "plain")) == 6
    assert losses(tmp_path / "plain") == losses(tmp_path / "straight") == losses(interrupted)
    knn = [r["knn_top1"] for r in records(tmp_path / "straight") if "knn_top1" in r]
    assert [r["step"] for r in records(interrupted) if "knn_top1" in r] == [2, 4, 6]
    assert [r["knn_top1"] for r in records(interrupted) if "knn_top1" in r] == knn
    events = EventAccumulator(str(next((tmp_path / "straight").rglob("events.out.tfevents.*")).parent))
    events.Reload()  # the tracker got the same records
    assert [e.step for e in events.Scalars("knn_top1")] == [2, 4, 6]
    assert [e.value for e in events.Scalars("knn_top1")] == pytest.approx(knn, rel=1e-6)  # stored as float32
    plain = safetensors.torch.load_file(tmp_path / "plain" / "fcmae_model.safetensors")
    for out in (tmp_path / "straight", interrupted):
        weights = safetensors.torch.load_file(out / "fcmae_model.safetensors")
        assert all(torch.equal(plain[k], weights[k]) for k in plain), out.name


def test_loading_the_monitor_draws_nothing_from_the_global_rng(crops):
    before = torch.get_rng_state()
    KNNMonitor(crops, (SIZE, SIZE), num_workers=1)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow  # several processes, or a training run of minutes on 2 cores
def test_two_processes_shard_the_monitor_and_log_the_same_knn(probe, crops, tmp_path):
    """Under two processes (gloo) each computes half the features and gathers the rest; the result is the kNN of
    the whole set, as probe.py computes it on the run's model, and no process waits on the other past --timeout."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "pretrain.py"),
           *RUN, "--batch-size", "4", "--data-path", str(crops), "--output-dir", str(out), "--max-steps", "2",
           "--monitor-data", str(crops), "--monitor-every", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, launcher_failure(result.stderr)
    knn = [r for r in records(out) if "knn_top1" in r]
    assert [r["step"] for r in knn] == [1, 2]  # written once, by the main process
    ours, sklearns = probe_knn(probe, crops, out / "fcmae_model.safetensors")
    assert knn[-1]["knn_top1"] == pytest.approx(ours, abs=1e-9) == pytest.approx(sklearns, abs=1e-9)


@pytest.mark.slow  # several processes, or a training run of minutes on 2 cores
def test_an_unreadable_image_in_one_share_ends_both_processes_with_one_line(crops, tmp_path):
    """Each process decodes its share; a file only process 1 reads is still every process's one-line error, given
    before training (none waits at a collective for a peer that has gone)."""
    broken = tmp_path / "broken"
    shutil.copytree(crops, broken)
    whole = sorted((broken / "val" / "coffee").iterdir())[0].read_bytes()
    cut = broken / "val" / "coffee" / "cut.png"
    cut.write_bytes(whole[:len(whole) // 2])  # an interrupted copy
    train, _, _ = find_labeled_images(broken / "train")
    val, _, _ = find_labeled_images(broken / "val")
    if (train + val).index(cut) % 2 == 0:  # process 1's share (images 1, 3, 5, ...): one more file before it
        (broken / "val" / "coffee" / "aaa.png").write_bytes(whole)
    train, _, _ = find_labeled_images(broken / "train")
    val, _, _ = find_labeled_images(broken / "val")
    assert (train + val).index(cut) % 2 == 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "pretrain.py"),
           *RUN, "--batch-size", "4", "--data-path", str(crops), "--output-dir", str(tmp_path / "run"),
           "--max-steps", "1", "--monitor-data", str(broken)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    ranks = launcher_failure(result.stderr)
    assert result.returncode != 0
    line = f"error: --monitor-data {broken}: 1 unreadable image(s), first {cut}: "
    assert ranks.count(line) == 2, ranks
    assert "gloo" not in ranks.lower() and "Traceback" not in ranks, ranks
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_shares_gathered_back_in_file_order(crops):
    """Ranks keep images r, r + world, ...; the gather puts each feature back at its image's row, padding dropped
    (119 images over 3 processes: shares of 40, 40 and 39)."""
    encoder = randomize_(fcmae.create_model("atto", img_size=SIZE, **SMALL)).encoder
    whole = KNNMonitor(crops, (SIZE, SIZE))
    shards = [KNNMonitor(crops, (SIZE, SIZE), rank=r, world=3) for r in range(3)]
    assert [len(s.images) for s in shards] == [40, 40, 39]
    local = [pooled_features(encoder, shard.normalized(shard.images)) for shard in shards]

    class Gather:  # what accelerator.gather does with each process's (padded) rows: concatenates them in rank order
        device = torch.device("cpu")

        def __init__(self, rank):
            self.rank = rank

        def gather(self, rows):
            padded = [torch.cat([f, f.new_zeros(len(rows) - len(f), f.shape[1])]) for f in local]
            torch.testing.assert_close(padded[self.rank], rows)
            return torch.cat(padded)

    expected = whole.features(encoder, SimpleNamespace(device=torch.device("cpu")), batch_size=16)
    assert len(expected) == 119
    for rank, shard in enumerate(shards):
        torch.testing.assert_close(shard.features(encoder, Gather(rank), batch_size=16), expected)


def test_monitor_images_are_probe_py_crops_normalized_like_training(probe, crops):
    """8-bit crops kept, normalized per batch: exactly probe.py's eval_transform(size, crop_pct=1.0) tensors, and
    the run's own mean / std when it has them."""
    files, _, _ = find_labeled_images(crops / "train")
    monitor = KNNMonitor(crops, (SIZE, SIZE))
    assert monitor.images.dtype == torch.uint8 and monitor.images.shape == (119, 3, SIZE, SIZE)
    expected = torch.stack([eval_transform((SIZE, SIZE), crop_pct=1.0)(load_rgb(f)) for f in files[:5]])
    assert torch.equal(monitor.normalized(monitor.images[:5]), expected)
    own = KNNMonitor(crops, (SIZE, SIZE), mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    torch.testing.assert_close(own.normalized(own.images[:5]), (expected * torch.tensor(
        [0.229, 0.224, 0.225]).view(3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) - 0.5) / 0.25,
        rtol=0, atol=1e-5)


def test_bad_monitor_data_is_a_one_line_error_at_start(crops, tmp_path, capsys):
    one_class = tmp_path / "one"
    for split in ("train", "val"):
        (one_class / split).mkdir(parents=True)
        (one_class / split / "only").symlink_to(crops / split / "astronaut", target_is_directory=True)
    no_val = tmp_path / "noval"
    (no_val / "train").mkdir(parents=True)
    (no_val / "train" / "astronaut").symlink_to(crops / "train" / "astronaut", target_is_directory=True)
    differ = tmp_path / "differ"
    for split, names in (("train", ["astronaut", "camera"]), ("val", ["astronaut", "coffee"])):
        (differ / split).mkdir(parents=True)
        for name in names:
            (differ / split / name).symlink_to(crops / split / name, target_is_directory=True)
    unlabeled = tmp_path / "unlabeled"  # images straight in train/ and val/: no class folders, no labels
    for split in ("train", "val"):
        (unlabeled / split).mkdir(parents=True)
        for photo in sorted((crops / split / "astronaut").iterdir())[:2]:
            (unlabeled / split / photo.name).symlink_to(photo)
    broken = tmp_path / "broken"  # every crop, and half of one in val/ (an interrupted copy)
    shutil.copytree(crops, broken)
    whole = sorted((broken / "val" / "coffee").iterdir())[0]
    (broken / "val" / "coffee" / "cut.png").write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    cases = {tmp_path / "missing": "is not a folder", no_val: "has no val/ folder", one_class: "has 1 class folder",
             differ: "train/ and val/ have different class folders (differing: camera, coffee)",
             unlabeled: f"{unlabeled / 'train'} has no class subfolders",
             broken: f"1 unreadable image(s), first {broken / 'val' / 'coffee' / 'cut.png'}: "}
    for monitor_data, message in cases.items():
        out = tmp_path / f"out-{monitor_data.name}"
        capsys.readouterr()
        assert call(RUN + ["--data-path", str(crops), "--output-dir", str(out), "--max-steps", "1",
                           "--monitor-data", str(monitor_data)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --monitor-data") and message in err and "\n" not in err, err
        assert not (out / "config.yaml").exists()  # nothing written
    assert call(RUN + ["--data-path", str(crops), "--output-dir", str(tmp_path / "x"), "--monitor-every", "0"]) == 2
    assert "monitor_every must be >= 1, got 0" in capsys.readouterr().err
