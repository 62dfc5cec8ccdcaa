"""Config files, flags, precedence, validation, the nested model and the round trip through config.yaml."""

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from fcmae import FCMAEConfig
from fcmae.config import (
    ClassifierConfig, ConfigError, FinetuneConfig, PretrainConfig, from_dict, load_yaml, parse_config, save_yaml,
)

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_paper_recipe():
    config = parse_config(PretrainConfig, ["--data-path", "x"])
    assert (config.model.mask_ratio, config.blr, config.weight_decay, config.epochs, config.warmup_epochs) == (
        0.6, 1.5e-4, 0.05, 800, 40.0)
    assert config.img_size == (224, 224) and config.model.norm_pix_loss and config.model.backend == "sparse"
    assert config.model == FCMAEConfig()  # the one model config, not a copy of its fields


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: tiny, mask-ratio: 0.75, decoder_embed_dim: 64}\nbatch_size: 16\ninput_size: 64\n"
                    "log_with: [tensorboard]\ndata_path: d\n")
    config = parse_config(PretrainConfig, ["--config", str(path), "--batch-size", "4", "--input-size", "64", "96",
                                           "--no-norm-pix-loss", "--lr", "1e-3", "--decoder-embed-dim", "32"])
    model = config.model
    assert model.name == "convnextv2_tiny" and model.mask_ratio == 0.75 and model.decoder_embed_dim == 32
    assert model.img_size == (64, 96) and model.norm_pix_loss is False  # input_size sets the model's img_size
    assert config.batch_size == 4 and config.img_size == (64, 96) and config.lr == 1e-3
    assert config.log_with == ["tensorboard"]
    renamed = parse_config(PretrainConfig, ["--config", str(path), "--model", "atto"])  # the name only
    assert renamed.model.name == "convnextv2_atto" and renamed.model.dims == (40, 80, 160, 320)
    assert renamed.model.mask_ratio == 0.75 and renamed.model.decoder_embed_dim == 64


def test_model_settings_at_the_top_level_as_config_files_wrote_them_before(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model: convnextv2_tiny\nmask_ratio: 0.75\ndecoder_depth: 2\nbackend: dense\ndata_path: d\n"
                    "input_size: [64]\n")
    config = parse_config(PretrainConfig, ["--config", str(path)])
    assert config.model == FCMAEConfig("tiny", img_size=64, mask_ratio=0.75, decoder_depth=2, backend="dense")
    path.write_text("model: {name: tiny, mask_ratio: 0.5}\nmask_ratio: 0.75\ndata_path: d\n")
    with pytest.raises(ConfigError, match="mask_ratio is set twice in .*old.yaml, at the top level and in the model"):
        parse_config(PretrainConfig, ["--config", str(path)])
    path.write_text("model: {name: tiny, img_size: 64}\ndata_path: d\n")
    with pytest.raises(ConfigError, match="img_size in .*model section: a training config sets it with input_size"):
        parse_config(PretrainConfig, ["--config", str(path)])


def test_round_trip_through_saved_yaml(tmp_path):
    config = parse_config(PretrainConfig, ["--data-path", "d", "--input-size", "64", "96", "--lr", "2e-3",
                                           "--log-with", "tensorboard", "--max-steps", "7", "--mask-ratio", "0.5",
                                           "--in-chans", "4", "--mean", "0.1", "0.2", "0.3", "0.4", "--std", "0.2",
                                           "0.2", "0.2", "0.25"])
    save_yaml(config, tmp_path / "config.yaml")
    again = parse_config(PretrainConfig, ["--config", str(tmp_path / "config.yaml")])
    assert dataclasses.asdict(again) == dataclasses.asdict(config)
    saved = load_yaml(tmp_path / "config.yaml")
    assert saved["input_size"] == [64, 96] and saved["model"]["mask_ratio"] == 0.5 and saved["model"]["in_chans"] == 4
    assert saved["mean"] == [0.1, 0.2, 0.3, 0.4] and saved["std"] == [0.2, 0.2, 0.2, 0.25]
    assert "img_size" not in saved["model"] and "depths" not in saved["model"]  # input_size; the named size's
    assert from_dict(PretrainConfig, saved) == again


@pytest.mark.parametrize("argv, message", [
    (["--mask-ration", "0.5"], "unknown flag --mask-ration in the command line; did you mean --mask-ratio\\?"),
    (["--batch-size", "many"], "batch_size must be an integer or auto, got 'many'"),
    (["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
    (["--model", "resnet"], "unknown model 'resnet'"),
    (["--input-size", "100"], "input_size must be one or two positive multiples of 32"),
    (["--input-size", "64", "64", "64"], "input_size must be one or two"),
    (["--mask-ratio", "1.0"], "mask_ratio must be in \\[0, 1\\)"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--backend", "minkowsky"], "unknown backend 'minkowsky'"),
    (["--in-chans", "0"], "in_chans must be >= 1"),
    (["--log-with", "mlflow"], "unknown tracker\\(s\\) mlflow"),
    (["--config", "/nonexistent.yaml"], "config file not found"),
    (["--min-lr", "nan"], "min_lr must be a finite number, got nan"),
    (["--input-size", "32"], "keeps 0 of its 1 patches of 32 px: the encoder would see nothing"),
    (["--mask-ratio", "0"], "keeps 49 of its 49 patches of 32 px: the encoder would see everything"),
])
def test_bad_flags_fail_with_one_line(argv, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(PretrainConfig, ["--data-path", "x", *argv])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("argv, text, message", [
    (["--lr", "1e39"], "", r"lr must be <= 100, got 1e\+39: no optimizer here trains that fast"),
    (["--blr", "inf"], "", "blr must be a finite number, got inf"),
    (["--blr", "50", "--batch-size", "1024"], "", "blr 50 x effective batch 1024 / 256 gives lr 200, above 100"),
    ([], "lr: .nan\n", "lr must be a finite number or null, got nan"),
    ([], "min_lr: .inf\n", "min_lr must be a finite number, got inf"),
])
def test_absurd_learning_rates_end_in_one_line_and_exit_2(tmp_path, capsys, argv, text, message):
    """Issue 22 D: --lr 1e39 passed validation, then ended in a 30-line overflow traceback."""
    from fcmae.cli import run_cli

    if text:
        (tmp_path / "c.yaml").write_text(text)
        argv = ["--config", str(tmp_path / "c.yaml"), *argv]
    assert run_cli(lambda args: parse_config(PretrainConfig, args), ["--data-path", "x", *argv]) == 2
    assert re.fullmatch(f"error: {message}.*\n", capsys.readouterr().err)  # "." stops at a newline: one line


@pytest.mark.parametrize("cls, values, name", [
    (PretrainConfig, {"lr": float("nan")}, "lr"),
    (PretrainConfig, {"warmup_epochs": float("inf")}, "warmup_epochs"),
    (PretrainConfig, {"mean": [0.5, float("nan"), 0.5], "std": [0.25] * 3}, "mean"),
    (FinetuneConfig, {"model": {"head_init_scale": float("inf")}}, "head_init_scale"),
    (FinetuneConfig, {"model": {"drop_path": float("nan")}}, "drop_path"),
])
def test_configs_built_in_code_refuse_non_finite_values(cls, values, name):
    """Files and flags stop nan / inf when they are read; validate stops them in a config built in code too."""
    with pytest.raises(ConfigError, match=f"{name} must be a finite number, got "):
        cls(data_path="x", **values).validate()


def test_the_linear_probe_recipe_reaches_its_lr_below_the_bound():
    config = parse_config(FinetuneConfig, ["--data-path", "x", "--linear-probe"])
    assert config.base_lr(16384) == 6.4  # blr 0.1 x 16384 / 256 with SGD: the largest lr of any recipe
    with pytest.raises(ConfigError, match=r"blr 0.1 x effective batch 262144 / 256 gives lr 102\.4, above 100"):
        config.base_lr(262144)


@pytest.mark.parametrize("text, message", [
    ("mask_ration: 0.5\n", r"unknown key mask_ration in .*c.yaml; did you mean mask_ratio\?"),
    ("model: {name: atto, decoder_dept: 2}\n",
     r"unknown key decoder_dept in .*c.yaml's model section; did you mean decoder_depth\?"),
    ("zzz: 1\n", r"unknown key zzz in .*c.yaml; valid keys: model, data_path, output_dir"),
    ("batch_size: [1, 2]\n", r"batch_size must be an integer or auto, got \[1, 2\]"),
    ("model: {norm_pix_loss: maybe}\n", "norm_pix_loss must be true or false"),
    ("model: [atto]\n", "model in .*c.yaml's model section must be a model name or a mapping"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("model: [unclosed\n", "is not valid YAML"),
])
def test_unknown_or_mistyped_keys_in_a_file(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(PretrainConfig, ["--config", str(path)])
    assert "\n" not in str(info.value)


def test_shipped_configs_parse():
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(configs) == 21  # demo.yaml; 8 sizes x (pretrain, finetune); digits; the two finetune demos; photos pretraining
    for path in configs:
        cls = FinetuneConfig if "finetune" in path.parts else PretrainConfig
        config = parse_config(cls, ["--config", str(path), "--data-path", "x"])
        written = yaml.safe_load(path.read_text())["model"]
        assert config.model.name.endswith((written["name"] if isinstance(written, dict) else written).split("_")[-1])


@pytest.mark.parametrize("aa, message", [
    ("rand-m9-garbage", "aa 'rand-m9-garbage': unknown section 'garbage'; rand takes m, n, p, mstd"),
    ("rand-m9-mstd", "unknown section 'mstd'"),
    ("rand-m9.5", "section 'm9.5' needs an integer after 'm'"),
    ("rand-nn2", "unknown section 'nn2'; did you mean n\\?"),
    ("rnd-m9", "unknown policy 'rnd'; did you mean rand\\?"),
    ("augmix-m5-q3", "unknown section 'q3'"),
    ("original-m9", "unknown section 'm9'; original takes mstd"),
    ("rand-tnope", "unknown section 'tnope'; rand takes .* tweights, t3aw, t3a"),  # timm: the default set
    ("auto", "unknown policy 'auto'"),
])
def test_timm_transform_strings_are_checked_when_the_config_is_read(aa, message):
    """timm builds rand-m9-garbage as rand-m9 without a word; the config refuses it before anything runs."""
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(FinetuneConfig, ["--data-path", "x", "--aa", aa])
    assert "\n" not in str(info.value)


def test_valid_timm_transform_strings_pass():
    for aa in ("", "rand-m9-mstd0.5-inc1", "rand-m7-n3-p0.8-mmax12", "rand-mstd1-tweights", "augmix-m5-w4-d2-a1-b1",
               "original-mstd0.5", "v0", "3a"):
        assert parse_config(FinetuneConfig, ["--data-path", "x", "--aa", aa]).aa == aa
    assert parse_config(FinetuneConfig, ["--data-path", "x", "--interpolation", "lanczos"]).interpolation == "lanczos"
    with pytest.raises(ConfigError, match="interpolation must be one of bicubic, .* got 'bicubik'; did you mean "
                                          "bicubic\\?"):
        parse_config(FinetuneConfig, ["--data-path", "x", "--interpolation", "bicubik"])


def test_finetune_config_holds_its_model_as_pretraining_does():
    """Issue 26 item 4: FinetuneConfig.model is a ClassifierConfig, as PretrainConfig.model is an FCMAEConfig; the
    flags stay flat (--model, --in-chans, --drop-path) and config.yaml nests them under model:."""
    config = parse_config(FinetuneConfig, ["--data-path", "x", "--model", "tiny", "--in-chans", "4", "--mean",
                                           *["0.5"] * 4, "--std", *["0.25"] * 4, "--drop-path", "0.2"])
    assert config.model == ClassifierConfig("convnextv2_tiny", in_chans=4, drop_path=0.2)
    assert config.to_dict()["model"] == {"name": "convnextv2_tiny", "in_chans": 4, "num_classes": 0,
                                         "drop_path": 0.2, "head_init_scale": 0.001}
    assert from_dict(FinetuneConfig, config.to_dict()).model == config.model  # config.yaml reads back
    flat = {**config.to_dict(), "model": "tiny", "in_chans": 4, "drop_path": 0.2}  # a config.yaml written before
    assert from_dict(FinetuneConfig, flat).model == config.model
    with pytest.raises(ConfigError, match="in_chans is set twice in the config, at the top level and in the model"):
        from_dict(FinetuneConfig, {**config.to_dict(), "in_chans": 3})
    with pytest.raises(ConfigError, match="unknown flag --mask-ratio in the command line"):  # a pretraining setting
        parse_config(FinetuneConfig, ["--data-path", "x", "--mask-ratio", "0.5"])


def test_configs_are_canonical_when_built_and_validate_only_checks(monkeypatch, tmp_path):
    """Issue 26 item 4: validate() changed values in place (num_workers -1, "~", the model, compile_mode). They are
    now canonical as soon as the config exists, and validate() leaves every value as it found it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    pretrain = PretrainConfig(data_path="~/photos", num_workers=-1, input_size=[64, 96], compile_mode="default",
                              model={"name": "atto", "mask_ratio": 0.5})
    assert pretrain.data_path == str(tmp_path / "photos") and pretrain.num_workers >= 1 and pretrain.compile
    assert pretrain.model == FCMAEConfig("atto", img_size=(64, 96), mask_ratio=0.5)
    finetune = FinetuneConfig(data_path="x", model="pico")
    assert finetune.model == ClassifierConfig("convnextv2_pico")
    for config in (pretrain, finetune, parse_config(PretrainConfig, ["--data-path", "x", "--model", "femto"])):
        before = copy.deepcopy(config.to_dict())
        config.validate()
        assert config.to_dict() == before


def test_a_model_changed_after_building_is_checked_not_rebuilt():
    config = PretrainConfig(data_path="x", input_size=[64])
    config.model = FCMAEConfig("atto", img_size=96)
    with pytest.raises(ConfigError, match=r"the model's img_size \[96, 96\] is not input_size \[64\]"):
        config.validate()


def test_parse_config_reads_each_layer_s_keys_once(monkeypatch, tmp_path):
    """Issue 26 item 4: canonical() ran three times on the same settings (file, flags, then their merge)."""
    import fcmae.config.command_line as command_line

    calls = []
    original = command_line.canonical
    monkeypatch.setattr(command_line, "canonical", lambda *a, **k: calls.append(k["source"]) or original(*a, **k))
    monkeypatch.setattr("fcmae.config.training_configs.canonical",
                        lambda *a, **k: calls.append("again") or original(*a, **k))
    (tmp_path / "c.yaml").write_text("model: {name: atto, mask_ratio: 0.5}\n")
    config = parse_config(PretrainConfig, ["--config", str(tmp_path / "c.yaml"), "--data-path", "x", "--seed", "3"])
    assert calls == [str(tmp_path / "c.yaml"), "the command line"]
    assert (config.model.mask_ratio, config.seed) == (0.5, 3)
