"""Config files, flags, precedence, validation and the round trip through config.yaml."""

import dataclasses

import pytest
import yaml

from fcmae.config import ConfigError, PretrainConfig, load_yaml, parse_config, save_yaml


def test_defaults_are_the_paper_recipe():
    config = parse_config(PretrainConfig, ["--data-path", "x"])
    assert (config.mask_ratio, config.blr, config.weight_decay, config.epochs, config.warmup_epochs) == (
        0.6, 1.5e-4, 0.05, 800, 40.0)
    assert config.image_size == (224, 224) and config.norm_pix_loss and config.backend == "sparse"


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\nbatch_size: 16\nmask-ratio: 0.75\ninput_size: 64\nlog_with: [tensorboard]\n")
    config = parse_config(PretrainConfig, ["--config", str(path), "--batch-size", "4", "--input-size", "64", "96",
                                           "--no-norm-pix-loss", "--lr", "1e-3"])
    assert config.model == "convnextv2_tiny" and config.batch_size == 4 and config.mask_ratio == 0.75
    assert config.image_size == (64, 96) and config.norm_pix_loss is False and config.lr == 1e-3
    assert config.log_with == ["tensorboard"]


def test_round_trip_through_saved_yaml(tmp_path):
    config = parse_config(PretrainConfig, ["--data-path", "d", "--input-size", "64", "96", "--lr", "2e-3",
                                           "--log-with", "tensorboard", "--max-steps", "7"])
    save_yaml(config, tmp_path / "config.yaml")
    again = parse_config(PretrainConfig, ["--config", str(tmp_path / "config.yaml")])
    assert dataclasses.asdict(again) == dataclasses.asdict(config)
    assert load_yaml(tmp_path / "config.yaml")["input_size"] == [64, 96]


@pytest.mark.parametrize("argv, message", [
    (["--mask-ration", "0.5"], "unknown argument\\(s\\) --mask-ration 0.5; valid flags: --config, --model"),
    (["--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
    (["--model", "resnet"], "unknown model 'resnet'"),
    (["--input-size", "100"], "input_size must be one or two positive multiples of 32"),
    (["--input-size", "64", "64", "64"], "input_size must be one or two"),
    (["--mask-ratio", "1.0"], "mask_ratio must be in \\[0, 1\\)"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--backend", "minkowsky"], "unknown backend 'minkowsky'"),
    (["--log-with", "mlflow"], "unknown tracker\\(s\\) mlflow"),
    (["--config", "/nonexistent.yaml"], "config file not found"),
    (["--min-lr", "nan"], "min_lr must be a finite number, got nan"),
    (["--input-size", "32"], "keeps 0 of its 1 patches of 32 px: the encoder would see nothing"),
    (["--mask-ratio", "0"], "keeps 49 of its 49 patches of 32 px: the encoder would see everything"),
])
def test_bad_flags_fail_with_one_line(argv, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(PretrainConfig, argv)
    assert "\n" not in str(info.value)


def test_unknown_or_mistyped_keys_in_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mask_ration: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) mask_ration in .*c.yaml; valid keys: model, data_path"):
        parse_config(PretrainConfig, ["--config", str(path)])
    path.write_text("batch_size: [1, 2]\n")
    with pytest.raises(ConfigError, match="batch_size must be an integer, got \\[1, 2\\]"):
        parse_config(PretrainConfig, ["--config", str(path)])
    path.write_text("norm_pix_loss: maybe\n")
    with pytest.raises(ConfigError, match="norm_pix_loss must be true or false"):
        parse_config(PretrainConfig, ["--config", str(path)])
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse_config(PretrainConfig, ["--config", str(path)])
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        parse_config(PretrainConfig, ["--config", str(path)])


def test_shipped_configs_parse(tmp_path):
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        if "finetune" in path.parts:
            continue
        config = parse_config(PretrainConfig, ["--config", str(path)])
        assert yaml.safe_load(path.read_text())["model"].endswith(config.model.split("_")[1])
