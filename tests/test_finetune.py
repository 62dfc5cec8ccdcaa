"""finetune.py: the recipe pieces, and end to end on real digits from a checkpoint pretrain.py made."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from accelerate.state import AcceleratorState
from PIL import Image

import finetune
import pretrain
from fcmae.config import LINEAR_PROBE_RECIPE, ConfigError
from fcmae.config.training_configs import flat_settings
from fcmae.data import write_digits
from fcmae.layer_decay import layer_id, param_groups_layer_decay
from fcmae.linear_probe import attach_probe, fold_probe
from helpers import ROOT, error_lines, launcher_failure, run_finetune, run_pretrain

FAST = ["--model", "atto", "--input-size", "64", "--batch-size", "32", "--num-workers", "0", "--lr", "2e-3",
        "--warmup-epochs", "0.5", "--layer-decay", "0.9", "--layer-decay-type", "single", "--drop-path", "0",
        "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "", "--model-ema-decay", "0.99",
        "--log-every", "5"]
STATED_ACCURACY = 55.0  # percent top-1 after 3 epochs on the 1438 training digits (chance: 10)
PROBE = ["--model", "atto", "--input-size", "64", "--batch-size", "32", "--num-workers", "0", "--linear-probe",
         "--warmup-epochs", "1", "--log-every", "1"]  # the MAE protocol otherwise (blr 0.1, no augmentation)
PROBE_ACCURACY = 10.0  # above chance (10 classes) after 4 epochs of 22 steps (docs/finetuning.md, Linear probe)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Digits in the ImageNet layout, FCMAE on them (no labels), then a 3-epoch fine-tune from that checkpoint."""
    tmp = tmp_path_factory.mktemp("finetune")
    data = write_digits(tmp / "digits")
    assert run_pretrain(["--data-path", str(data), "--output-dir", str(tmp / "pre"), "--input-size", "64",
                         "--batch-size", "32", "--max-steps", "90", "--lr", "3e-4", "--warmup-steps", "10",
                         "--decoder-embed-dim", "64", "--num-workers", "0", "--vis-every", "0"]) == 0
    out = tmp / "ft"
    assert run_finetune(FAST + ["--data-path", str(data), "--finetune", str(tmp / "pre/fcmae_model.safetensors"),
                                "--output-dir", str(out), "--epochs", "3"]) == 0
    return data, tmp / "pre" / "fcmae_model.safetensors", out


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fine_tuning_reaches_the_stated_accuracy(trained):
    _, _, out = trained
    records = metrics(out)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert set(records[0]) >= {"epoch", "train_loss", "val_acc1", "val_acc5", "lr", "ema_acc1", "ema_acc5"}
    best = max(max(r["val_acc1"], r["ema_acc1"]) for r in records)
    assert best >= STATED_ACCURACY, records
    assert records[-1]["train_loss"] < records[0]["train_loss"]


@pytest.mark.slow
def test_saved_model_loads_strictly_in_timm_and_eval_reproduces_its_accuracy(trained, capsys):
    data, _, out = trained
    state = safetensors.torch.load_file(out / "classifier.safetensors")
    with safetensors.safe_open(str(out / "classifier.safetensors"), "pt") as f:
        meta = f.metadata()
    model = timm.create_model("convnextv2_atto", num_classes=10)
    model.load_state_dict(state)  # strict
    assert meta["weights"] in ("raw", "ema") and json.loads(meta["classes"]) == [str(i) for i in range(10)]
    assert json.loads(meta["input_size"]) == [64] and json.loads(meta["crop_pct"]) == 0.875
    capsys.readouterr()
    # No --input-size: the eval runs at the 64 px the model was trained and saved with, not the default 224.
    result = finetune.main(["--eval", "--resume", str(out / "classifier.safetensors"), "--data-path", str(data),
                            "--model", "atto", "--num-workers", "0"])
    AcceleratorState._reset_state(reset_partial_state=True)
    assert result["acc1"] == pytest.approx(float(meta["val_acc1"]), abs=1e-3)
    assert result["images"] == 359
    assert "eval at input_size [64] (saved with the model), crop_pct 0.875 (saved with the model)" in (
        capsys.readouterr().out)


@pytest.mark.slow
def test_eval_settings_explicit_flags_win_and_old_files_use_their_run_config(trained, tmp_path, capsys):
    data, _, out = trained
    common = ["--eval", "--data-path", str(data), "--model", "atto", "--num-workers", "0"]
    capsys.readouterr()
    run_finetune(common + ["--resume", str(out / "classifier.safetensors"), "--input-size", "96",
                           "--interpolation", "bilinear"])
    printed = capsys.readouterr().out
    assert "eval at input_size [96], crop_pct 0.875 (saved with the model), interpolation bilinear" in printed
    # A model file without these metadata keys (written before they existed, under the old name) takes them from
    # its run's config.
    state, meta = safetensors.torch.load_file(out / "classifier.safetensors"), None
    with safetensors.safe_open(str(out / "classifier.safetensors"), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in finetune.EVAL_SETTINGS}
    old = tmp_path / "old"
    old.mkdir()
    safetensors.torch.save_file(state, str(old / "model.safetensors"), metadata=meta)
    (old / "config.yaml").write_text((out / "config.yaml").read_text())
    assert finetune.saved_eval_settings(str(old / "model.safetensors")) == {
        "input_size": [64], "crop_pct": 0.875, "interpolation": "bicubic", "in_chans": 3, "mean": [], "std": []}
    (old / "config.yaml").unlink()
    assert finetune.saved_eval_settings(str(old / "model.safetensors")) == {}


@pytest.mark.slow
def test_two_processes_count_every_validation_image_once(trained, tmp_path):
    data, _, out = trained
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "finetune.py"),
           "--eval", "--resume", str(out / "classifier.safetensors"), "--data-path", str(data), "--model", "atto",
           "--input-size", "64", "--num-workers", "0", "--batch-size", "7", "--output-dir", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, launcher_failure(result.stderr)
    with safetensors.safe_open(str(out / "classifier.safetensors"), "pt") as f:
        recorded = float(f.metadata()["val_acc1"])
    line = next(l for l in result.stdout.splitlines() if "val_acc1" in l)
    assert "on 359 images" in line  # odd, in batches of 7 on 2 processes: the padding duplicates are dropped
    assert f"val_acc1 {recorded:.2f}" in line


@pytest.mark.slow
def test_linear_probe_trains_only_the_head_and_saves_a_timm_model(trained, tmp_path, capsys):
    data, pretrained, _ = trained
    out = tmp_path / "probe"
    capsys.readouterr()
    assert run_finetune(PROBE + ["--data-path", str(data), "--finetune", str(pretrained), "--output-dir",
                                 str(out), "--epochs", "4"]) == 0
    printed = capsys.readouterr().out
    # 1438 images in batches of 32: 44 batches an epoch. MAE's 16384 would make one step of all 44; the recipe's
    # min_steps_per_epoch (20) caps the accumulation at 2: 22 steps an epoch, and the lr follows the batch.
    assert ("accum_steps 2: effective batch 64 = 32 x 1 process(es) x 2 instead of 16384, so that an epoch of 44 "
            "batch(es) makes 22 optimizer steps, not 1") in printed
    assert "effective batch 64 = 32 x 1 x 2; lr 2.500e-02 = blr 0.1 x 64 / 256" in printed
    probe = timm.create_model("convnextv2_atto", num_classes=10)
    probe.load_state_dict(safetensors.torch.load_file(out / "classifier.safetensors"))
    start = finetune.build_model(finetune.parse_config(finetune.FinetuneConfig, PROBE + [
        "--data-path", str(data), "--finetune", str(pretrained)]), 10)
    trained_state, start_state = probe.state_dict(), start.state_dict()
    assert all(torch.equal(trained_state[k], start_state[k]) for k in start_state if k.startswith("stages."))
    assert max(r["val_acc1"] for r in metrics(out)) > PROBE_ACCURACY, metrics(out)


def test_linear_probe_switches_to_the_mae_protocol_and_flags_override_it(tmp_path):
    def parse(*argv):
        return finetune.parse_config(finetune.FinetuneConfig, ["--data-path", "x", *argv])

    probe = parse("--linear-probe")
    settings = flat_settings(probe.to_dict())  # the flags' names: drop_path is the model's
    assert {k: settings[k] for k in LINEAR_PROBE_RECIPE} == LINEAR_PROBE_RECIPE
    assert (probe.optimizer, probe.blr, probe.effective_batch_size, probe.epochs) == ("sgd", 0.1, 16384, 90)
    assert probe.mixup == probe.cutmix == probe.smoothing == probe.model.drop_path == probe.weight_decay == 0
    assert probe.aa == "" and not probe.model_ema
    assert parse().optimizer == "adamw" and parse().mixup == 0.8  # without the switch: the fine-tuning recipe
    overridden = parse("--linear-probe", "--optimizer", "lars", "--epochs", "5", "--mixup", "0.2")
    assert (overridden.optimizer, overridden.epochs, overridden.mixup, overridden.blr) == ("lars", 5, 0.2, 0.1)
    # A fine-tuning config file gives way to the probe recipe; flags still win.
    from_file = parse("--config", str(ROOT / "configs/finetune/convnextv2_base.yaml"), "--linear-probe",
                      "--warmup-epochs", "3")
    assert (from_file.mixup, from_file.aa, from_file.epochs, from_file.warmup_epochs) == (0.0, "", 90, 3.0)
    assert from_file.model.name == "convnextv2_base" and from_file.layer_decay == 1.0
    assert from_file.model.drop_path == 0.0  # the file's model: section gives way to the recipe too
    # A config file written for probing keeps its own values.
    own = tmp_path / "probe.yaml"
    own.write_text("linear_probe: true\nepochs: 30\nblr: 0.05\n")
    mine = parse("--config", str(own))
    assert (mine.epochs, mine.blr, mine.optimizer) == (30, 0.05, "sgd")


def test_linear_probe_head_is_batchnorm_then_mae_init_and_lars_adapts_only_matrices():
    config = finetune.parse_config(finetune.FinetuneConfig, ["--data-path", "x", "--linear-probe", "--model", "atto",
                                                             "--optimizer", "lars"])
    model = finetune.build_model(config, 10)
    bn, fc = model.head.fc
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.1) and (fc.bias == 0).all()
    optimizer = finetune.optimizer_for(model, config, 0.5)
    assert isinstance(optimizer, timm.optim.Lars)
    adapt = {id(p): g["always_adapt"] for g in optimizer.param_groups for p in g["params"]}
    assert adapt == {id(fc.weight): True, id(fc.bias): False}
    assert all(g["weight_decay"] == 0 and g["momentum"] == 0.9 for g in optimizer.param_groups)


@pytest.mark.parametrize("argv", [[], ["--layer-decay", "1.0"], ["--optimizer", "sgd"]])
def test_no_weight_decay_on_grn_norms_and_biases(argv):
    config = finetune.parse_config(finetune.FinetuneConfig, ["--data-path", "x", "--model", "atto", *argv])
    model = finetune.build_model(config, 10)
    optimizer = finetune.optimizer_for(model, config, 1e-3)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        no_decay = "grn" in name or name.endswith(".bias") or p.ndim == 1  # GRN, biases, norm weights
        assert (decay[id(p)] == 0) == no_decay, name
    assert sum("grn" in name for name in dict(model.named_parameters())) == 2 * 12
    # The official head init: timm's std 0.02 scaled by head_init_scale 0.001. Its scale is read from the median
    # (|w| / 0.6745 for a normal): timm truncates at +-2 absolute, 100 std, and an RNG state left by an earlier test
    # can draw one weight at that bound, which alone doubles the std of 3200 weights.
    weight = model.head.fc.weight.detach()
    assert (weight.abs().median() / 0.6745).item() == pytest.approx(2e-5, rel=0.1)
    assert weight.abs().max().item() <= 2 * 0.001 + 1e-9


def test_pretraining_optimizer_leaves_grn_norms_biases_undecayed():
    import fcmae

    model = fcmae.create_model("atto", img_size=64, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), decoder_embed_dim=8)
    optimizer = pretrain.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = 0.0 if ("grn" in name or "norm" in name or name.endswith(".bias") or p.ndim == 1) else 0.05
        assert decay[id(p)] == expected, name


def test_effective_batch_size_sets_accumulation_and_says_so():
    config = finetune.parse_config(finetune.FinetuneConfig, ["--data-path", "x", "--batch-size", "64",
                                                             "--effective-batch-size", "4096"])
    assert config.effective_accum_steps(8, 10_000) == (8, "accum_steps 8 to reach effective batch 4096 = 64 x 8 "
                                                          "process(es) x 8")
    assert config.effective_accum_steps(1, 10_000)[0] == 64
    assert config.effective_accum_steps(1, 20)[0] == 20  # a dataset of 20 batches: accumulate all of them
    with pytest.raises(ConfigError, match="effective_batch_size 4096 is not a multiple of batch_size 64 x 3"):
        config.effective_accum_steps(3, 10_000)
    config.effective_batch_size = 0
    assert config.effective_accum_steps(3, 10_000) == (config.accum_steps, "")


def test_fold_probe_is_exact():
    model = attach_probe(timm.create_model("convnextv2_atto", num_classes=5, depths=(1, 1, 1, 1)))
    bn = model.head.fc[0]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    plain = timm.create_model("convnextv2_atto", num_classes=5, depths=(1, 1, 1, 1)).eval()
    plain.load_state_dict(fold_probe(model.state_dict()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-5)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.fc.1.weight", "head.fc.1.bias"]


def test_layer_ids_follow_the_official_release():
    depths = (2, 2, 6, 2)  # atto, "single": 12 layers, head 13
    assert layer_id("stem.0.weight", depths) == 1
    assert layer_id("stages.0.blocks.1.conv_dw.weight", depths) == 2
    assert layer_id("stages.1.downsample.1.weight", depths) == 3
    assert layer_id("stages.1.blocks.0.mlp.fc1.weight", depths) == 3
    assert layer_id("stages.3.blocks.1.mlp.grn.weight", depths) == 12
    assert layer_id("head.fc.weight", depths) == 13
    base = (3, 3, 27, 3)  # "group": 12 layers, head 13
    expected = {"stem.1.bias": 0, "stages.0.blocks.2.norm.weight": 1, "stages.1.downsample.0.weight": 2,
                "stages.1.blocks.0.conv_dw.weight": 2, "stages.2.downsample.1.weight": 3,
                "stages.2.blocks.0.mlp.fc2.weight": 3, "stages.2.blocks.26.mlp.fc2.weight": 11,
                "stages.3.downsample.1.bias": 12, "stages.3.blocks.2.norm.bias": 12, "head.norm.weight": 13}
    assert {k: layer_id(k, base, "group") for k in expected} == expected
    model = timm.create_model("convnextv2_atto", num_classes=3)
    groups = param_groups_layer_decay(model, depths, 0.05, 0.9, "single")
    scale = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scale[13] == 1.0 and scale[1] == pytest.approx(0.9**12)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.stages[0].blocks[0].mlp.grn.weight) in no_decay and id(model.stem[0].bias) in no_decay
    assert id(model.stem[0].weight) not in no_decay


@pytest.mark.parametrize("change, message", [
    ("no-val", "has no val/ folder"),
    ("no-data", "data path not found or not a folder: "),
    ("classes", "--num-classes 7 does not match the 10 class folders"),
    ("not-convnext", "not-a-convnext"),
    ("odd-batch", "batch_size must be even with mixup/cutmix"),
    ("eval-without-resume", "--eval needs --resume FILE"),
    ("eval-pretrained", "is an FCMAE pretraining model, not a classifier: fine-tune it with --finetune"),
    ("channels", "channels, the data config expects 4 (--in-chans, and one --mean / --std value per channel)"),
])
@pytest.mark.slow
def test_bad_inputs_end_with_one_line(trained, tmp_path, capsys, change, message):
    data, pretrained, _ = trained
    argv = FAST + ["--data-path", str(data), "--output-dir", str(tmp_path / "run"), "--epochs", "1"]
    if change == "no-val":
        (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
        argv += ["--data-path", str(tmp_path / "only_train")]
    elif change == "no-data":
        argv += ["--data-path", str(tmp_path / "nowhere")]
    elif change == "classes":
        argv += ["--num-classes", "7"]
    elif change == "not-convnext":
        bad = tmp_path / "not-a-convnext.safetensors"
        safetensors.torch.save_file({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)},
                                    str(bad))
        argv += ["--finetune", str(bad)]
    elif change == "eval-pretrained":
        argv += ["--eval", "--resume", str(pretrained)]
    elif change == "odd-batch":
        argv += ["--mixup", "0.8", "--batch-size", "31"]
    elif change == "channels":
        argv += ["--in-chans", "4", "--mean", *["0.5"] * 4, "--std", *["0.25"] * 4]
    else:
        argv += ["--eval"]
    assert run_finetune(argv) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_exact_resume_restores_weights_optimizer_and_ema(tmp_path, monkeypatch):
    data = write_digits(tmp_path / "digits", limit=300)  # 240 train images: 7 steps per epoch
    common = FAST + ["--data-path", str(data), "--epochs", "2", "--save-every", "7", "--seed", "1",
                     "--mixup", "0.5", "--cutmix", "0.5"]
    assert run_finetune(common + ["--output-dir", str(tmp_path / "straight")]) == 0

    from fcmae.training import Run

    original_save = Run.save_checkpoint

    def save_then_crash(self, on_save=None):
        path = original_save(self, on_save)
        if self.step == 7:
            raise KeyboardInterrupt  # preempted after the first epoch's checkpoint
        return path

    monkeypatch.setattr(Run, "save_checkpoint", save_then_crash)
    assert run_finetune(common + ["--output-dir", str(tmp_path / "resumed")]) == 130
    monkeypatch.setattr(Run, "save_checkpoint", original_save)
    assert run_finetune(common + ["--output-dir", str(tmp_path / "resumed"), "--resume", "auto"]) == 0

    for name in ["model.safetensors", "ema.safetensors"]:
        a = safetensors.torch.load_file(tmp_path / "straight/checkpoints/step_00000014" / name)
        b = safetensors.torch.load_file(tmp_path / "resumed/checkpoints/step_00000014" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert metrics(tmp_path / "straight")[-1] == metrics(tmp_path / "resumed")[-1]
    state = json.loads((tmp_path / "resumed/checkpoints/step_00000014/trainer_state.json").read_text())
    assert state["info"]["best_epoch"] in (0, 1) and "best_acc1" in state["info"]


@pytest.mark.slow
def test_the_recipe_augmentation_survives_its_strongest_posterize(trained):
    """rand-m9-mstd0.5 reaches magnitude 10, where timm's PosterizeIncreasing keeps 0 bits (Pillow 13 refuses)."""
    data, _, _ = trained
    config = finetune.parse_config(finetune.FinetuneConfig, ["--data-path", str(data), "--input-size", "64"])
    assert config.aa == "rand-m9-mstd0.5-inc1"  # the default recipe
    train_set, _, _ = finetune.datasets(config)
    ops = [op for op in finetune._augment_ops(train_set.transform) if op.name == "PosterizeIncreasing"]
    assert ops
    op = ops[0]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    img = Image.open(train_set.files[0]).convert("RGB")
    assert np.asarray(op(img)).max() == 0  # all bits dropped: black, as in Pillow < 13
    op.magnitude = 0
    assert np.asarray(op(img)).max() > 0


@pytest.mark.slow
def test_a_max_steps_run_evaluates_and_saves_at_its_last_step(trained, tmp_path):
    data, pretrained, _ = trained
    out = tmp_path / "short"
    assert run_finetune(FAST + ["--data-path", str(data), "--finetune", str(pretrained), "--output-dir",
                                str(out), "--max-steps", "3", "--no-model-ema"]) == 0
    assert [(r["step"], r["epoch"]) for r in metrics(out)] == [(3, 0)]  # mid-epoch: 44 steps per epoch
    assert (out / "classifier.safetensors").is_file()


@pytest.mark.slow
def test_end_to_end_pretrain_convert_finetune_against_random_init(trained, tmp_path):
    """The README's story: FCMAE on the digits (labels unused), fcmae-convert to timm, fine-tune; and the same
    fine-tuning budget from a random init."""
    data, pretrained, from_fcmae = trained
    timm_file = tmp_path / "atto_timm.safetensors"
    done = subprocess.run([sys.executable, "-m", "fcmae.convert", str(pretrained), str(timm_file), "--to", "timm"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    runs = {"converted": tmp_path / "converted", "random": tmp_path / "random"}
    assert run_finetune(FAST + ["--data-path", str(data), "--finetune", str(timm_file), "--output-dir",
                                str(runs["converted"]), "--epochs", "3"]) == 0
    assert run_finetune(FAST + ["--data-path", str(data), "--output-dir", str(runs["random"]),
                                "--epochs", "3"]) == 0
    # Converting first is the same start as handing finetune.py the FCMAE file: identical runs.
    assert metrics(runs["converted"]) == metrics(from_fcmae)
    best = {name: max(max(r["val_acc1"], r["ema_acc1"]) for r in metrics(out)) for name, out in runs.items()}
    print(f"digits, 3 epochs: from FCMAE {best['converted']:.2f}, from random init {best['random']:.2f}")
    assert min(best.values()) > 20.0, best  # both learn (chance: 10); README reports the full-length comparison
