"""fcmae.checkpoints: one `load` for every input, safe unpickling, file modes, and timm's rules as our proof."""

import os
import pickle
import stat

import pytest
import safetensors.torch
import timm
import torch
from timm.models.convnext import checkpoint_filter_fn

import fcmae
import fcmae.cli.visualize
from fcmae import convert
from helpers import SMALL, randomize_, randomized_small_model
from official_layout import official_state, save_official


class Evil:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_load_recognizes_every_input_kind(tmp_path):
    model = randomized_small_model()
    ours = model.state_dict()
    fcmae.save_model(model, tmp_path / "model.safetensors")
    save_official(tmp_path / "me.pth", official_state(ours, me=True), wrapped=True)
    save_official(tmp_path / "dense.pt", official_state(ours, me=False, prefix=False), wrapped=False)
    timm_state = convert.to_timm(tmp_path / "model.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in timm_state.items()}}, tmp_path / "timm_ddp.pth")
    safetensors.torch.save_file(timm_state, str(tmp_path / "timm.safetensors"))
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    safetensors.torch.save_file(ours, str(step / "model.safetensors"), metadata={"format": "pt"})
    (step / "trainer_state.json").write_text('{"step": 2}')
    (step / "config.yaml").write_text("model: convnextv2_atto\nmask_ratio: 0.6\n")

    for name in ("pre", "old"):  # a run folder: its model file (the old name too) and config.yaml
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("model: convnextv2_atto\nmask_ratio: 0.6\n")
    fcmae.save_model(model, tmp_path / "pre" / "fcmae_model.safetensors")
    fcmae.save_model(model, tmp_path / "old" / "model.safetensors")
    (tmp_path / "exported").mkdir()  # what fcmae-convert --to timm writes into a folder
    safetensors.torch.save_file(timm_state, str(tmp_path / "exported" / "model.safetensors"))
    (tmp_path / "exported" / "config.json").write_text('{"architecture": "convnextv2_atto", "num_classes": 0}')
    (tmp_path / "hf").mkdir()
    safetensors.torch.save_file(timm_state, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "convnextv2"}')
    with pytest.raises(ValueError, match="is a transformers folder: load it with transformers"):
        fcmae.load(tmp_path / "hf")

    expected = {"model.safetensors": ("model file", "fcmae"), "pre": ("run folder", "fcmae"),
                "old": ("run folder", "fcmae"), "exported": ("timm folder", "timm"), "me.pth": ("torch file", "official-me"),
                "dense.pt": ("torch file", "official-dense"), "timm_ddp.pth": ("torch file", "timm"),
                "timm.safetensors": ("safetensors weights", "timm"),
                "run/checkpoints/step_00000002": ("training-state folder", "fcmae")}
    for name, (kind, layout) in expected.items():
        loaded = fcmae.load(tmp_path / name)
        assert (loaded.kind, loaded.layout) == (kind, layout), name
        assert not any(k.startswith("module.") for k in loaded.state)
    assert fcmae.load(tmp_path / "model.safetensors").model_config == model.config
    assert fcmae.load(step).step == 2 and fcmae.load(step).model_config.name == "convnextv2_atto"


def test_unknown_inputs_fail_with_one_line_naming_the_known_formats(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    for name in ("notes.txt", "empty", "other.safetensors"):
        with pytest.raises(ValueError) as e:
            fcmae.load(tmp_path / name)
        message = str(e.value)
        assert "\n" not in message and name in message
        if name != "notes.txt":
            assert "expected an fcmae model file" in message and "official ConvNeXt V2" in message


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_malicious_pickle_is_refused_as_needing_arbitrary_unpickling(tmp_path, how, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    if how == "pickle":
        path.write_bytes(pickle.dumps({"model": Evil()}))
    else:
        torch.save({"model": {"w": torch.zeros(1)}, "hook": Evil()}, path)
    with pytest.raises(ValueError, match=r"evil.pth was refused: loading it needs arbitrary unpickling.*system"):
        fcmae.load(path)
    assert not (tmp_path / "PWNED").exists()
    visualize = fcmae.cli.visualize.main(["--checkpoint", str(path), "--images", str(tmp_path), "--out", "g.png"])
    assert visualize == 2 and not (tmp_path / "PWNED").exists()


def test_model_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        fcmae.save_model(fcmae.create_model("atto", **SMALL), tmp_path / "m.safetensors")
        assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o644
        os.umask(0o077)
        fcmae.save_model(fcmae.create_model("atto", **SMALL), tmp_path / "private.safetensors")
        assert stat.S_IMODE((tmp_path / "private.safetensors").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_official_dense_to_timm_matches_timms_own_filter():
    """timm's checkpoint_filter_fn renames the official dense encoder + classifier exactly as our key table does."""
    model = randomize_(timm.create_model("convnextv2_atto", num_classes=5, depths=(1, 1, 2, 1), dims=(16, 24, 32, 40),
                                         conv_mlp=False))
    ours = {(k if k.startswith("head.") else "encoder." + k): v for k, v in model.state_dict().items()}
    official = official_state({k: v for k, v in ours.items() if not k.startswith("head.")}, me=False, prefix=False)
    official.update({"norm.weight": ours["head.norm.weight"], "norm.bias": ours["head.norm.bias"],
                     "head.weight": ours["head.fc.weight"], "head.bias": ours["head.fc.bias"]})
    theirs = checkpoint_filter_fn(official, model)
    mine = convert.to_timm(official, conv_mlp=False)
    assert set(theirs) == set(mine) == set(model.state_dict())
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)
