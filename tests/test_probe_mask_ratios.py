"""benchmarks/probe.py --mask-ratios: one pretraining run per ratio, each probed, and its arguments checked up front."""

from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two pretrainings and their probes: minutes on 2 cores
def test_a_sweep_pretrains_once_per_ratio_and_probes_each(probe, tmp_path):
    out = tmp_path / "probe"
    rows = probe.main(["--quick", "--steps", "2", "--mask-ratios", "0.4", "0.75", "--train-per-photo", "2",
                       "--val-per-photo", "1", "--batch-size", "8", "--num-workers", "0", "--out", str(out),
                       "--device", "cpu"])
    # one random row (the ratio only enters pretraining), then one row per ratio; a sweep defaults to the timm init
    assert [r["features"] for r in rows] == ["timm init, random", "timm init, mask 0.4, step 2 of 2",
                                             "timm init, mask 0.75, step 2 of 2"]
    assert [r["mask_ratio"] for r in rows] == [None, 0.4, 0.75]
    runs = [out / "convnextv2_atto-timm-2-seed0-mask0.4", out / "convnextv2_atto-timm-2-seed0-mask0.75"]
    for run, ratio in zip(runs, (0.4, 0.75)):
        assert yaml.safe_load((run / "config.yaml").read_text())["model"]["mask_ratio"] == ratio
        assert run.with_name(run.name + ".log").is_file()  # each run keeps its own log ("mask0.4" is no suffix)
    assert (runs[0] / "timm.safetensors").read_bytes() != (runs[1] / "timm.safetensors").read_bytes()


@pytest.mark.parametrize("argv, message", [
    (["--mask-ratios", "0.4", "1.0"], "--mask-ratios must lie strictly between 0 and 1, got 1"),
    (["--mask-ratios", "0.6", "0.6"], "--mask-ratios lists a ratio twice"),
    (["--steps", "0", "10"], "--steps must be at least 1"),
    (["--device", "cuda"], "no CUDA device is visible"),
])
def test_bad_arguments_stop_before_any_work(probe, tmp_path, capsys, argv, message):
    if argv[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit) as stop:
        probe.main([*argv, "--out", str(tmp_path / "probe")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "probe").exists()
