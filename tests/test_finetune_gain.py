"""benchmarks/finetune_gain.py at its --quick size: pretrain.py -> fcmae.convert -> finetune.py from the converted
weights and from a random init, per seed, and the table. It checks the path and the table, not the gain."""

import json

import pytest
import safetensors.torch
import yaml
from helpers import ROOT, benchmark_module


@pytest.fixture(scope="module")
def gain():
    return benchmark_module("finetune_gain")


@pytest.mark.slow  # pretrain, convert and four fine-tunes: minutes on 2 cores
def test_quick_runs_pretrain_convert_and_both_finetunes(gain, tmp_path, capsys):
    out = tmp_path / "gain"
    rows = gain.main(["--quick", "--out", str(out), "--num-workers", "0", "--json", str(tmp_path / "rows.json")])
    printed = capsys.readouterr().out

    assert [r["seed"] for r in rows] == [0, 1]
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    for row in rows:
        assert 0 <= row["fcmae"] <= row["fcmae_best"] <= 100 and 0 <= row["random"] <= row["random_best"] <= 100
        assert row["gain"] == pytest.approx(row["fcmae"] - row["random"])
        assert row["train_images"] == 2 * 17 and row["val_images"] == 2 * 17
    assert "| seed | labelled crops | from FCMAE, top-1 (best epoch) | from random init, top-1 (best epoch) | gain |" \
        in printed
    assert "| mean |" in printed and printed.count("$ ") == 6  # pretrain, convert, 2 seeds x 2 fine-tunes

    # The pretraining saw the unlabeled train crops; the FCMAE fine-tune started from its converted timm file, the
    # random one from nothing, both with the demo's fine-tuning config (settings recorded in config.yaml).
    pre = out / "pretrain-4crops-4steps"
    assert (pre / "fcmae_model.safetensors").is_file()
    timm_state = safetensors.torch.load_file(pre / "timm.safetensors")
    assert "stem.0.weight" in timm_state and not any(k.startswith("decoder") for k in timm_state)
    recipe = yaml.safe_load((ROOT / "configs" / "finetune" / "photos_demo.yaml").read_text())
    for init, start in (("fcmae", str(pre / "timm.safetensors")), ("random", "")):
        run = out / f"ft-labeled-4-2-2-seed1-{init}{f'-{pre.name}' * (init == 'fcmae')}-1ep"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["finetune"] == start and config["seed"] == 1
        assert {k: config[k] for k in ("lr", "layer_decay", "aa", "color_jitter", "input_size")} == \
            {k: recipe[k] for k in ("lr", "layer_decay", "aa", "color_jitter", "input_size")}
        assert (run / "classifier.safetensors").is_file()

    # Seed s draws its own labelled crops, a subset of the crops pretraining saw; val is every val crop.
    crops = out / "crops-4-2"
    drawn = {}
    for seed in (0, 1):
        labeled = out / f"labeled-4-2-2-seed{seed}"
        files = sorted(labeled.glob("train/*/*.png"))
        assert all((crops / "train" / f.parent.name / f.name).read_bytes() == f.read_bytes() for f in files)
        assert sorted(p.name for p in (labeled / "val").iterdir()) == sorted(p.name for p in (crops / "val").iterdir())
        drawn[seed] = [f.relative_to(labeled) for f in files]
    assert drawn[0] != drawn[1]


def test_bad_sizes_are_one_line_errors(gain, tmp_path, capsys):
    for argv, message in ((["--labels-per-class", "0"], "--labels-per-class must be at least 1"),
                          (["--labels-per-class", "9", "--train-per-photo", "8"], "exceeds --train-per-photo")):
        with pytest.raises(SystemExit) as stop:
            gain.main([*argv, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # nothing written before the check
