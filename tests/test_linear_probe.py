"""finetune.py --linear-probe on small data: MAE's effective batch where the data is large, a smaller one (and lr)
where an epoch would otherwise be a single step; on real photo crops it reaches what logistic regression reaches."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from accelerate.state import AcceleratorState

import fcmae
from fcmae.config import LINEAR_PROBE_RECIPE, ConfigError
from fcmae.data import find_labeled_images, load_rgb
from fcmae.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import finetune  # noqa: E402


def load_probe():
    spec = importlib.util.spec_from_file_location("probe", ROOT / "benchmarks" / "probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe_config(*argv: str) -> finetune.FinetuneConfig:
    return finetune.parse_config(finetune.FinetuneConfig, ["--data-path", "x", "--linear-probe", *argv])


def test_mae_batch_where_the_data_is_large_a_capped_one_where_it_is_small():
    probe = probe_config("--batch-size", "128")
    assert LINEAR_PROBE_RECIPE["min_steps_per_epoch"] == probe.min_steps_per_epoch == 20
    # ImageNet-1k on 8 processes: 1251 batches of 1024 an epoch, 16 of them per step of 16384: 79 steps. MAE's.
    assert probe.effective_accum_steps(8, 1_281_167 // 1024) == (16, "accum_steps 16 to reach effective batch 16384 "
                                                                     "= 128 x 8 process(es) x 16")
    # 1438 digits in batches of 32 (44 a epoch): MAE's batch would be all 44 in one step; capped at 2 (22 steps).
    small = probe_config("--batch-size", "32")
    accum, note = small.effective_accum_steps(1, 1438 // 32)
    assert accum == 2 and small.base_lr(32 * accum) == pytest.approx(0.1 * 64 / 256)
    assert note == ("accum_steps 2: effective batch 64 = 32 x 1 process(es) x 2 instead of 16384, so that an epoch "
                    "of 44 batch(es) makes 22 optimizer steps, not 1 (min_steps_per_epoch 20); the lr follows the "
                    "batch")
    assert "\n" not in note
    # Fewer batches than the minimum: one batch per step, and the note says how to get more.
    accum, note = small.effective_accum_steps(2, 12)
    assert accum == 1 and "makes 12 optimizer steps, not 1" in note and "lower --batch-size for more" in note
    # --min-steps-per-epoch 0 is MAE's protocol everywhere; a fine-tune (no switch) never caps.
    assert probe_config("--min-steps-per-epoch", "0").effective_accum_steps(1, 44)[0] == 44
    plain = finetune.parse_config(finetune.FinetuneConfig, ["--data-path", "x", "--effective-batch-size", "1024"])
    assert plain.min_steps_per_epoch == 0 and plain.effective_accum_steps(1, 44)[0] == 32
    with pytest.raises(ConfigError, match="min_steps_per_epoch must be >= 0"):
        probe_config("--min-steps-per-epoch", "-1")


@pytest.mark.slow  # several processes, or a training run of minutes on 2 cores
def test_linear_probe_reaches_logistic_regression_on_the_same_frozen_features(tmp_path, capsys):
    """probe.py's crops of 17 real photos at 64 px (816 train, 408 val; class = photo) and a frozen encoder: 10
    epochs of --linear-probe land within 3 points of scikit-learn's logistic regression (C by 3-fold CV on train, as
    benchmarks/probe.py) on the same features. MAE's batch would make one step an epoch, 10 in all (about 30%)."""
    probe = load_probe()
    crops = probe.write_crops(tmp_path / "crops", train_per_photo=48, val_per_photo=24)
    encoder = tmp_path / "fcmae_model.safetensors"
    torch.manual_seed(0)
    fcmae.save_model(fcmae.create_model("atto", img_size=64), encoder)  # timm init: features worth ~50% here
    out = tmp_path / "probe"
    argv = ["--linear-probe", "--model", "atto", "--input-size", "64", "--batch-size", "32", "--num-workers", "0",
            "--data-path", str(crops), "--finetune", str(encoder), "--output-dir", str(out), "--epochs", "10",
            "--warmup-epochs", "1", "--no-progress"]
    capsys.readouterr()
    try:
        assert run_cli(finetune.main, argv) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    printed = capsys.readouterr().out
    assert ("accum_steps 1: effective batch 32 = 32 x 1 process(es) x 1 instead of 16384, so that an epoch of 25 "
            "batch(es) makes 25 optimizer steps, not 1") in printed
    assert "lr 1.250e-02 = blr 0.1 x 32 / 256; 250 steps" in printed
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]

    # The frozen features the probe's head sees (pre-logits), of the evaluation crops, from the saved probe.
    config = finetune.parse_config(finetune.FinetuneConfig, argv)
    model = timm.create_model("convnextv2_atto", num_classes=17)
    model.load_state_dict(safetensors.torch.load_file(out / "classifier.safetensors"))
    model.eval()
    transform = finetune.eval_transform(config)
    split = {}
    for name in ("train", "val"):
        files, labels, _ = find_labeled_images(crops / name)
        with torch.no_grad():
            images = torch.stack([transform(load_rgb(f)) for f in files])
            feats = torch.cat([model.forward_head(model.forward_features(b), pre_logits=True)
                               for b in images.split(128)])
        split[name] = feats.double().numpy(), np.asarray(labels)
    logistic = probe.probe(*split["train"], *split["val"])["linear"]
    assert 30 < logistic < 90  # a task the features neither fail nor solve
    assert last["epoch"] == 9 and last["val_acc1"] >= logistic - 3, (last, logistic)
