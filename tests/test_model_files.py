"""save_model / load_model: the model.safetensors format."""

import json

import pytest
import safetensors.torch
import torch

import fcmae
from helpers import SMALL, randomize_


def test_round_trip_keeps_weights_config_and_outputs(tmp_path):
    model = randomize_(fcmae.create_model("atto", img_size=(64, 96), mask_ratio=0.75, **SMALL))
    path = tmp_path / "model.safetensors"
    fcmae.save_model(model, path, {"step": "12"})
    loaded = fcmae.load_model(path)
    assert loaded.config == model.config
    imgs, mask = torch.randn(2, 3, 64, 96), model.random_masking(2)
    assert torch.equal(model(imgs, mask)[1], loaded(imgs, mask)[1])
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata()["step"] == "12" and json.loads(f.metadata()["config"])["dims"] == list(SMALL["dims"])
    assert not list(tmp_path.glob("*.tmp"))


def test_overrides_apply_on_load(tmp_path):
    path = tmp_path / "m.safetensors"
    fcmae.save_model(fcmae.create_model("atto", **SMALL), path)
    loaded = fcmae.load_model(path, backend="dense", mask_ratio=0.5)
    assert loaded.encoder.backend == "dense" and loaded.mask_ratio == 0.5


def test_clear_errors_for_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        fcmae.load_model(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fcmae.load_model(junk)
    good = tmp_path / "good.safetensors"
    fcmae.save_model(fcmae.create_model("atto", **SMALL), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fcmae.load_model(truncated)
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="no ConvNeXt V2 encoder weights found.*expected an fcmae model file"):
        fcmae.load_model(foreign)  # `load` names the inputs it knows


def test_mismatched_weights_list_the_offending_keys(tmp_path):
    path = tmp_path / "m.safetensors"
    fcmae.save_model(fcmae.create_model("atto", **SMALL), path)
    expected = r"shape mismatch 14 key\(s\): decoder.blocks.0.conv_dw.bias: \(32,\) vs model \(48,\)"
    with pytest.raises(ValueError, match=expected):
        fcmae.load_model(path, decoder_embed_dim=48)


def test_submodules_are_reachable_after_a_plain_import():
    import importlib
    import subprocess
    import sys

    code = "import fcmae; print(fcmae.convert.to_timm.__name__, fcmae.visualize.reconstruction_grid.__name__)"
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["to_timm", "reconstruction_grid"], result.stderr
    assert importlib.import_module("fcmae").training.Run is not None
