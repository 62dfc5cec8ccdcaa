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
    # A fine-tuning run's config names a timm model: no FCMAE model in it.
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
