"""Reading what pretrain.py writes, as it writes it: a run folder, its model file and its training-state folders.

The run config nests the model (`model: {name: ..., mask_ratio: ...}`); older runs wrote its settings at the top
level. Both must load, through one reader (`FCMAEConfig.from_run_config`).
"""

import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState

import fcmae
from fcmae import FCMAEConfig
from fcmae.checkpoints import names
from fcmae.cli import run_cli
from fcmae.config import FinetuneConfig, save_yaml
from helpers import write_photos

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import pretrain  # noqa: E402

# tests/test_pretrain.py's small, fast run.
FAST = ["--model", "atto", "--input-size", "64", "--batch-size", "4", "--decoder-embed-dim", "64",
        "--num-workers", "0", "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1", "--vis-every", "0"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A pretrain.py output folder of a 2-step run (mask ratio 0.75, not the default, so that a reader that falls
    back to defaults is caught)."""
    tmp = tmp_path_factory.mktemp("run")
    write_photos(tmp / "photos", 8, size=96)
    out = tmp / "out"
    try:
        status = run_cli(pretrain.main, [*FAST, "--data-path", str(tmp / "photos"), "--output-dir", str(out),
                                         "--max-steps", "2", "--mask-ratio", "0.75"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert status == 0
    return out


def test_run_config_nests_the_model(run_folder):
    config = yaml.safe_load((run_folder / names.RUN_CONFIG).read_text())
    assert isinstance(config["model"], dict) and "mask_ratio" not in config  # the layout the loader must read


def test_load_model_reads_a_training_state_folder(run_folder):
    step = sorted((run_folder / names.CHECKPOINTS).iterdir())[-1]
    model = fcmae.load_model(step)
    assert model.config.mask_ratio == 0.75 and model.config.img_size == (64, 64)
    assert model.config.decoder_embed_dim == 64
    saved = fcmae.load_model(run_folder / names.PRETRAINED_MODEL)
    assert saved.config == model.config
    # The last checkpoint and the model file handed out hold the same weights.
    for (key, a), b in zip(model.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), key


def test_load_model_reads_a_run_folder(run_folder):
    loaded = fcmae.load(run_folder)
    assert loaded.kind == "run folder" and loaded.model_config.mask_ratio == 0.75
    assert fcmae.load_model(run_folder).config == loaded.model_config


def test_from_run_config_reads_both_layouts():
    nested = {"model": {"name": "atto", "mask_ratio": 0.75, "decoder_depth": 2}, "input_size": [64, 96],
              "batch_size": 8}
    flat = {"model": "convnextv2_atto", "mask_ratio": 0.75, "decoder_depth": 2, "input_size": [64, 96],
            "batch_size": 8}
    expected = FCMAEConfig("atto", img_size=(64, 96), mask_ratio=0.75, decoder_depth=2)
    assert FCMAEConfig.from_run_config(nested) == expected
    assert FCMAEConfig.from_run_config(flat) == expected
    # A fine-tuning run's config holds a timm classifier: no FCMAE model in it, in the layout finetune.py writes
    # (the model nested, as a ClassifierConfig) and in the older one (its name).
    written = FinetuneConfig(data_path="x", model={"name": "atto", "drop_path": 0.2}).to_dict()
    assert isinstance(written["model"], dict) and FCMAEConfig.from_run_config(written) is None
    assert FCMAEConfig.from_run_config({"model": "convnextv2_atto", "finetune": "x.safetensors"}) is None


def test_a_classifier_is_named_as_what_it_is(tmp_path):
    """The error says what the input really is: a fine-tuning run's classifier, not "no config in metadata"."""
    from fcmae.checkpoints import write_safetensors

    timm = pytest.importorskip("timm")
    model = timm.create_model("convnextv2_atto", num_classes=3)
    write_safetensors(model.state_dict(), tmp_path / "classifier.safetensors", {"format": "timm"})
    (tmp_path / names.RUN_CONFIG).write_text("model: convnextv2_atto\nfinetune: pre.safetensors\n")
    with pytest.raises(ValueError) as e:
        fcmae.load_model(tmp_path / "classifier.safetensors")
    message = str(e.value)
    assert "fine-tuning run's model file (a classifier)" in message and "metadata" not in message


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_a_fine_tuning_runs_classifier_is_named_in_either_layout(tmp_path, layout):
    from fcmae.checkpoints import write_safetensors

    timm = pytest.importorskip("timm")
    write_safetensors(timm.create_model("convnextv2_atto", num_classes=3).state_dict(),
                      tmp_path / names.CLASSIFIER, {"format": "timm"})
    config = FinetuneConfig(data_path="x", model={"name": "atto", "num_classes": 3})
    if layout == "nested":
        save_yaml(config, tmp_path / names.RUN_CONFIG)  # as finetune.py writes it
    else:
        (tmp_path / names.RUN_CONFIG).write_text("model: convnextv2_atto\nnum_classes: 3\nfinetune: ''\n")
    loaded = fcmae.load(tmp_path)
    assert loaded.kind == "run folder" and loaded.model_config is None
    assert loaded.what() == "a fine-tuning run's run folder (a classifier)"


def test_a_damaged_run_config_is_named_in_one_line(run_folder, tmp_path):
    """config.yaml has one reader (fcmae.config.load_yaml): the scripts' --config, fcmae.load and the exports."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_folder, copy)
    (copy / names.RUN_CONFIG).write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match=f"^{copy / names.RUN_CONFIG} is not valid YAML: [^\n]*$"):
        fcmae.load(copy)
