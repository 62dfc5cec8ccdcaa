"""benchmarks/probe.py end to end, tiny: crops of real photos -> pretrain.py -> fcmae.convert -> timm -> probes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fcmae

ROOT = Path(__file__).resolve().parents[1]


def test_crops_are_real_photos_split_by_region(probe, tmp_path):
    root = probe.write_crops(tmp_path / "data", train_per_photo=2, val_per_photo=1)
    photos = probe.photo_files()
    assert len(photos) >= 15 and all(p.is_file() for p in photos)
    for split, count in (("train", 2), ("val", 1)):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == sorted(p.stem for p in photos)
        files = sorted((root / split).rglob("*.png"))
        assert len(files) == count * len(photos)
        assert Image.open(files[0]).size == (probe.CROP, probe.CROP)
    assert probe.CROP // 32 * (probe.CROP // 32) >= 16  # at least 16 patches per image
    # Reused, not rewritten, on a second call.
    stamp = (root / "val").stat().st_mtime_ns
    assert probe.write_crops(root, 5, 5) == root and (root / "val").stat().st_mtime_ns == stamp


@pytest.mark.slow  # pretrains, converts and probes end to end (about a minute on 2 cores)
def test_probe_runs_the_cli_path_end_to_end(probe, tmp_path):
    out = tmp_path / "probe"
    rows = probe.main(["--steps", "2", "3", "--inits", "timm", "--train-per-photo", "2", "--val-per-photo", "1",
                       "--batch-size", "8", "--num-workers", "0", "--out", str(out), "--json", str(tmp_path / "r.json"),
                       "--device", "cpu"])
    assert [r["features"] for r in rows] == ["raw pixels (16x16)", "timm init, random", "timm init, step 2 of 3",
                                             "timm init, step 3 of 3"]
    assert json.loads((tmp_path / "r.json").read_text()) == rows
    quick = probe.main(["--quick", "--steps", "2", "3", "--train-per-photo", "2", "--val-per-photo", "1",
                        "--batch-size", "8", "--num-workers", "0", "--out", str(out), "--device", "cpu"])  # reused runs
    drop = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "pretrain_seconds")}  # noqa: E731
    assert [drop(r) for r in quick] == [drop(r) for r in rows[1:]]  # the same rows, without the raw-pixel one
    for row in rows:
        assert 0 <= row["linear"] <= 100 and 0 <= row["knn"] <= 100 and row["C"] in probe.PROBE_C
    # Both pretrained rows come from one pretrain.py run (its metrics at their step) through fcmae.convert (a timm
    # file beside the model probed: the step-2 checkpoint's, then the run's final model file).
    run = out / "convnextv2_atto-timm-3-seed0"
    records = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    for steps, row, folder in ((2, rows[2], run / "checkpoints" / "step_00000002"), (3, rows[3], run)):
        assert row["loss"] == records[steps]["loss"]
        assert (folder / "timm.safetensors").is_file()
    step2, step3 = ((folder / "timm.safetensors").read_bytes() for folder in (run / "checkpoints" / "step_00000002", run))
    assert step2 != step3  # two points of the run, not one model probed twice
    # The features are the pooled stage-4 maps of the FCMAE encoder with every patch visible.
    model = fcmae.load_model(out / "convnextv2_atto-timm-3-seed0" / "fcmae_model.safetensors").eval()
    imgs = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = model.encoder(imgs).mean((2, 3)).double().numpy()
    got = probe.features(out / "convnextv2_atto-timm-3-seed0" / "timm.safetensors", "convnextv2_atto", imgs, "cpu")
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_probes_separate_separable_features(probe):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 30)
    feats = rng.normal(size=(90, 8)) + 5 * np.eye(3, 8)[labels]
    result = probe.probe(feats[::2], labels[::2], feats[1::2], labels[1::2])
    assert result["linear"] > 95 and result["knn"] > 95
    shuffled = probe.probe(feats[::2], rng.permutation(labels[::2]), feats[1::2], labels[1::2])
    assert shuffled["linear"] < 80
