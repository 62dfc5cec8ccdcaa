"""FCMAEConfig: filled from the name, validated once, frozen, serialized into model files and read back."""

import dataclasses
import json

import pytest
import safetensors.torch
import torch

import fcmae
from fcmae import FCMAEConfig
from fcmae.errors import ConfigError
from helpers import SMALL

# The metadata fcmae.save_model wrote before FCMAEConfig existed (a custom 64x96 model, no in_chans entry).
OLD_METADATA = {"format": "fcmae", "step": "6", "config": json.dumps(dict(
    name="custom", depths=[1, 1, 2, 1], dims=[16, 24, 32, 40], img_size=[64, 96], patch_size=32, mask_ratio=0.75,
    decoder_depth=1, decoder_embed_dim=32, norm_pix_loss=True, drop_path_rate=0.0, backend="sparse", init="timm"))}


def test_defaults_fill_the_named_size():
    config = FCMAEConfig()
    assert config.name == "convnextv2_atto" and config.depths == (2, 2, 6, 2) and config.dims == (40, 80, 160, 320)
    assert config.img_size == (224, 224) and config.in_chans == 3 and config.grid == (7, 7)
    assert config.kept_patches == 19  # int(49 * 0.4), as the official masks keep
    tiny = FCMAEConfig("tiny", img_size=96)
    assert tiny.name == "convnextv2_tiny" and tiny.depths == (3, 3, 9, 3) and tiny.img_size == (96, 96)
    assert FCMAEConfig("atto", depths=[1, 1, 1, 1]).depths == (1, 1, 1, 1)  # a named size with other depths


def test_values_are_typed_and_frozen():
    config = FCMAEConfig.from_dict({"name": "atto", "img_size": [64, 96], "mask_ratio": "0.5", "depths": [1, 1, 2, 1]})
    assert config.img_size == (64, 96) and config.mask_ratio == 0.5 and config.depths == (1, 1, 2, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mask_ratio = 0.7
    assert hash(config) == hash(FCMAEConfig.from_dict(config.to_dict()))


@pytest.mark.parametrize("settings, message", [
    (dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\), got 1.0"),
    (dict(mask_ratio=0.0), "keeps 49 of its 49 patches of 32 px: the encoder would see everything"),
    (dict(img_size=32), "keeps 0 of its 1 patches of 32 px: the encoder would see nothing"),
    (dict(img_size=100), "image size 100x100 is not a multiple of the patch size 32"),
    (dict(img_size=(64, 64, 64)), "img_size must be 2 values, each an integer, got"),
    (dict(backend="minkowsky"), "unknown backend 'minkowsky'; choose one of sparse, dense, minkowski"),
    (dict(init="jax"), "unknown init 'jax'; choose one of timm, official"),
    (dict(in_chans=0), "in_chans must be >= 1, got 0"),
    (dict(name="resnet50"), "unknown model 'resnet50'; choose one of convnextv2_atto"),
    (dict(name="custom"), "a custom model needs depths and dims"),
    (dict(depths=(1, 1, 1)), r"depths \[1, 1, 1\] and dims \[40, 80, 160, 320\] must be positive and of equal"),
    (dict(patch_size=16), "patch_size must equal the encoder's total stride 32"),
    (dict(decoder_depth=-1), "decoder_depth must be >= 0"),
    (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\)"),
    (dict(norm_pix_loss="yes"), "norm_pix_loss must be true or false, got 'yes'"),
    (dict(mask_ration=0.5), "unknown key mask_ration in the model config; did you mean mask_ratio?"),
])
def test_bad_settings_fail_once_with_one_line(settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        FCMAEConfig.from_dict(settings)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


def test_replace_validates_and_a_new_name_brings_its_size():
    config = FCMAEConfig("atto", img_size=64)
    assert config.replace(mask_ratio=0.5).mask_ratio == 0.5
    assert config.replace(name="tiny").dims == (96, 192, 384, 768)
    small = FCMAEConfig("atto", img_size=64, **SMALL)
    assert small.replace(name="tiny").dims == SMALL["dims"]  # a size of its own stays
    with pytest.raises(ConfigError, match="mask_ratio must be in"):
        config.replace(mask_ratio=2.0)
    with pytest.raises(ConfigError, match="did you mean backend"):
        config.replace(backnd="dense")


def test_metadata_round_trip_and_files_written_before():
    config = FCMAEConfig("custom", depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), img_size=(64, 96), mask_ratio=0.75,
                         decoder_embed_dim=32)
    metadata = config.to_metadata()
    assert metadata["format"] == "fcmae" and json.loads(metadata["config"])["img_size"] == [64, 96]
    assert FCMAEConfig.from_metadata(metadata) == config
    assert FCMAEConfig.from_metadata(OLD_METADATA) == config  # in_chans absent: 3
    assert FCMAEConfig.from_metadata({"format": "timm", "model": "convnextv2_atto"}) is None
    with pytest.raises(ConfigError, match="not valid JSON"):
        FCMAEConfig.from_metadata({"format": "fcmae", "config": "{oops"})


def test_a_file_written_before_loads(tmp_path):
    """A model file with the old metadata (as pretrain.py wrote it) loads into the same model."""
    model = fcmae.FCMAE(FCMAEConfig.from_metadata(OLD_METADATA))
    torch.nn.init.normal_(model.decoder.mask_token)
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "old.safetensors"), metadata=OLD_METADATA)
    loaded = fcmae.load_model(tmp_path / "old.safetensors")
    assert loaded.config == model.config and torch.equal(loaded.decoder.mask_token, model.decoder.mask_token)


def test_create_model_is_fcmae_of_the_config():
    torch.manual_seed(0)
    a = fcmae.create_model("atto", img_size=64, **SMALL)
    torch.manual_seed(0)
    b = fcmae.FCMAE(FCMAEConfig("atto", img_size=64, **SMALL))
    assert a.config == b.config and all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    with pytest.raises(TypeError, match="FCMAE takes an FCMAEConfig"):
        fcmae.FCMAE({"name": "atto"})
