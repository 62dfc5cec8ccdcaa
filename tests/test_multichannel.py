"""N-channel 16-bit data end to end, as microscopy and satellite users have it: fcmae-stats, pretrain.py
--in-chans N, fcmae-convert, timm with in_chans=N, and finetune.py --in-chans N (4-channel TIFF, 1-channel PNG,
and 16-bit RGB TIFF, which fine-tunes through the array path too)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from accelerate.state import AcceleratorState
from PIL import Image

import fcmae
from fcmae.data import demo_image_files, load_rgb
from fcmae.data.stats import channel_stats
from fcmae.training import run_cli
from helpers import rel_err

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import finetune  # noqa: E402
import pretrain  # noqa: E402

tifffile = pytest.importorskip("tifffile", reason="16-bit TIFF needs tifffile: pip install 'fcmae[tiff]'")

SIZE = 96  # the written images; the runs crop 64 px from them


def call(main, argv):
    try:
        return run_cli(main, argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def write_image(path: Path, photo: int, offset: int, channels: int) -> None:
    """A real photo's crop as 16-bit data: 4 channels (RGB and an inverted luminance, as a 4th band) or RGB, saved
    as TIFF; or 1 channel (luminance), saved as a 16-bit PNG."""
    rgb = np.asarray(load_rgb(demo_image_files()[photo]), dtype=np.float32) / 255
    crop = rgb[offset:offset + SIZE, offset:offset + SIZE]
    luminance = crop.mean(-1, keepdims=True)
    pixels = {4: np.concatenate([crop, 1 - luminance], -1), 3: crop, 1: luminance}[channels]
    data = (pixels * 65535).round().astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    if channels == 1:
        Image.fromarray(data[..., 0]).save(path)  # mode I;16
    else:
        tifffile.imwrite(path, data)


@pytest.fixture(params=[(4, ".tif"), (1, ".png"), (3, ".tif")], ids=["4-channel-tiff", "1-channel-png", "rgb-tiff"])
def stack(request, tmp_path):
    """(channels, unlabeled folder, labeled folder with train/ val/): two photos, two classes."""
    channels, suffix = request.param
    for i in range(8):
        write_image(tmp_path / "unlabeled" / f"img_{i}{suffix}", photo=i % 4, offset=8 * i, channels=channels)
    for split, offsets in (("train", range(0, 48, 8)), ("val", range(4, 28, 8))):
        for label, photo in (("a", 0), ("b", 1)):
            for offset in offsets:
                write_image(tmp_path / "labeled" / split / label / f"{offset}{suffix}", photo, offset, channels)
    return channels, tmp_path / "unlabeled", tmp_path / "labeled"


def flags(values) -> list[str]:
    return [f"{v:.6f}" for v in values]


def test_pretrain_convert_timm_finetune(stack, tmp_path, capsys):
    channels, unlabeled, labeled = stack
    mean, std, count, _ = channel_stats(str(unlabeled), in_chans=channels)
    assert count == 8 and len(mean) == channels and all(0 < s < 0.5 for s in std)
    norm = ["--in-chans", str(channels), "--mean", *flags(mean), "--std", *flags(std)]

    pre = tmp_path / "pre"
    assert call(pretrain.main, ["--data-path", str(unlabeled), "--output-dir", str(pre), "--model", "atto",
                                "--input-size", "64", "--batch-size", "4", "--decoder-embed-dim", "32",
                                "--num-workers", "0", "--max-steps", "4", "--warmup-steps", "1", "--lr", "1e-3",
                                "--log-every", "2", "--vis-every", "4", "--no-progress", *norm]) == 0
    losses = [json.loads(line)["loss"] for line in (pre / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (pre / "vis" / "step_00000004.png").is_file()  # the RGB preview of N-channel reconstructions
    model = fcmae.load_model(pre / "fcmae_model.safetensors")
    assert model.config.in_chans == channels

    # fcmae-convert, then timm with in_chans: the same function as our encoder with every patch visible
    timm_file = tmp_path / "timm.safetensors"
    done = subprocess.run([sys.executable, "-m", "fcmae.convert", str(pre / "fcmae_model.safetensors"),
                           str(timm_file), "--to", "timm"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    net = timm.create_model("convnextv2_atto", pretrained=True, num_classes=0, in_chans=channels,
                            pretrained_cfg_overlay=dict(file=str(timm_file))).eval()
    x = torch.randn(2, channels, 64, 64)
    with torch.no_grad():
        assert rel_err(net.forward_features(x), model.eval().encoder(x)) <= 1e-5

    # finetune.py from the pretrained file, on labeled N-channel data; then --eval reproduces its accuracy, with the
    # channels and normalization saved in the model file (no --in-chans / --mean / --std given again)
    ft = tmp_path / "ft"
    common = ["--data-path", str(labeled), "--model", "atto", "--input-size", "64", "--batch-size", "4",
              "--num-workers", "0", "--no-progress", *norm]
    assert call(finetune.main, common + ["--finetune", str(pre / "fcmae_model.safetensors"), "--output-dir",
                                         str(ft), "--epochs", "2", "--warmup-epochs", "0", "--lr", "1e-3",
                                         "--mixup", "0", "--cutmix", "0", "--no-model-ema"]) == 0
    out = capsys.readouterr().out
    assert f"--aa, --color-jitter, --reprob apply to 8-bit RGB photos only: off for this {channels}-channel" in out
    records = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and all(0 <= r["val_acc1"] <= 100 for r in records)
    result = call(finetune.main, common[:-len(norm)] + ["--eval", "--resume", str(ft / "classifier.safetensors")])
    assert result == 0
    out = capsys.readouterr().out
    assert f"in_chans {channels} (saved with the model), mean {[float(v) for v in flags(mean)]} (saved with the model)" in out
    assert f"val_acc1 {records[-1]['val_acc1']:.2f}" in out


def test_channel_settings_that_cannot_work_are_one_line_errors(tmp_path, capsys):
    write_image(tmp_path / "img.tif", 0, 0, channels=4)
    base = ["--data-path", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--input-size", "64"]
    cases = [
        (["--in-chans", "4"], "in_chans 4 needs --mean and --std, one value per channel"),
        (["--in-chans", "4", "--mean", "0.5", "0.5", "--std", "0.2", "0.2"], "mean and std have 2 value(s) but"),
        (["--in-chans", "4", "--mean", "0.5", "--std", "0.2", "0.1"], "mean has 1 value(s) and std 2"),
        (["--mean", "0.5", "0.5", "0.5", "0.5", "--std", "0.2", "0.2", "0.2", "0.2"], "but the model takes 3"),
        (["--in-chans", "4", "--mean", *["0.5"] * 4, "--std", *["0.2"] * 4, "--gpu-augment"],
         "gpu_augment decodes RGB photos"),
    ]
    for extra, message in cases:
        assert call(pretrain.main, base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert not (tmp_path / "out").exists()  # nothing written before the config was refused
