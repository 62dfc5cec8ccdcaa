"""fcmae.exports through `fcmae-convert`: transformers folders, Hub-ready timm folders, the official layout and feature
pyramids, from real pretraining and fine-tuning runs, official-layout files and timm files, checked on real photos."""

import argparse
import errno
import hashlib
import json
import logging
import os
import stat
import sys
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch

import fcmae
import fcmae.exports
from fcmae.cli import convert as convert_cli
from fcmae import convert as conv
from fcmae.data import eval_transform, load_rgb
from helpers import (SMALL, one_line_error, randomize_, randomized_small_model, rel_err, run_finetune, run_pretrain,
                     write_photos)
from official_layout import official_state, save_official

transformers = pytest.importorskip("transformers")  # the dev extra installs it

SIZE = 64


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A real pretraining run (atto, 64 px, 4 steps, a checkpoint at step 2) and a 2-step fine-tuning run from it on
    an ImageFolder of photos (3 classes); both on scikit-image's photos."""
    tmp = tmp_path_factory.mktemp("runs")
    photos = write_photos(tmp / "photos", 12, size=96)
    assert run_pretrain(["--model", "atto", "--data-path", str(tmp / "photos"), "--output-dir",
                         str(tmp / "pre"), "--input-size", str(SIZE), "--batch-size", "4", "--max-steps", "4",
                         "--save-every", "2", "--decoder-embed-dim", "32", "--num-workers", "0", "--lr", "1e-3",
                         "--warmup-steps", "1", "--log-every", "1", "--mask-ratio", "0.5"]) == 0
    for i, photo in enumerate(photos):
        split = "val" if i % 4 == 3 else "train"
        folder = tmp / "labeled" / split / ("cat", "dog", "fox")[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        load_rgb(photo).save(folder / f"{i}.png")
    assert run_finetune(["--model", "atto", "--data-path", str(tmp / "labeled"), "--finetune",
                         str(tmp / "pre" / "fcmae_model.safetensors"), "--output-dir", str(tmp / "ft"),
                         "--input-size", str(SIZE), "--batch-size", "4", "--max-steps", "2", "--num-workers",
                         "0", "--mixup", "0", "--cutmix", "0", "--aa", "", "--reprob", "0",
                         "--warmup-steps", "0", "--layer-decay", "0.9", "--layer-decay-type", "single"]) == 0
    return tmp


def images(count: int = 4) -> tuple[list, torch.Tensor]:
    """Real photos, and the batch finetune.py's evaluation transform makes of them."""
    from fcmae.data import demo_image_files

    pictures = [load_rgb(f) for f in demo_image_files()[:count]]
    return pictures, torch.stack([eval_transform((SIZE, SIZE))(p) for p in pictures])


def export(capsys, *argv) -> str:
    assert convert_cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def loaded(cls, folder):
    """from_pretrained, and what it reported: the missing/unexpected/mismatched keys, and the model."""
    model, info = cls.from_pretrained(str(folder), output_loading_info=True)
    return model.eval(), {k: sorted(v) for k, v in info.items() if v}


def timm_reference(weights: dict, num_classes: int, **kwargs) -> torch.nn.Module:
    model = timm.create_model("convnextv2_atto", num_classes=num_classes, **kwargs)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing)
    return model.eval()


def check_transformers_equals_timm(folder, reference: torch.nn.Module, imgs: torch.Tensor, num_classes: int):
    """Every output transformers gives equals timm's: the stage outputs, the last map, the pooled features (the
    final LayerNorm with eps 1e-6), the logits."""
    cls = transformers.ConvNextV2ForImageClassification if num_classes else transformers.ConvNextV2Model
    model, report = loaded(cls, folder)
    assert report == {}
    with torch.no_grad():
        out = model(imgs, output_hidden_states=True)
        final, stages = reference.forward_intermediates(imgs)
        pooled = reference.forward_head(final, pre_logits=True)
        base = out if not num_classes else model.convnextv2(imgs)
        assert rel_err(base.last_hidden_state, final) <= 1e-5
        assert rel_err(base.pooler_output, pooled) <= 1e-5
        assert len(out.hidden_states) == 5  # the embeddings, then the four stages
        for ours, theirs in zip(out.hidden_states[1:], stages):
            assert rel_err(ours, theirs) <= 1e-5
        if num_classes:
            assert rel_err(out.logits, reference(imgs)) <= 1e-5
    return model


# transformers ---------------------------------------------------------------------------------------------------


def test_transformers_from_a_pretraining_run_and_its_checkpoint(runs, tmp_path, capsys):
    run = runs / "pre"
    printed = export(capsys, run / "fcmae_model.safetensors", tmp_path / "hf", "--to", "transformers")
    assert "wrote a transformers folder" in printed and "no final LayerNorm in the input" in printed
    folder = tmp_path / "hf"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "preprocessor_config.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-6 and config["hidden_sizes"] == [40, 80, 160, 320]
    assert config["depths"] == [2, 2, 6, 2] and config["model_type"] == "convnextv2"

    # Both classes load every key, and nothing else (num_labels 0: the classifier is an Identity).
    pictures, batch = images()
    model = fcmae.load_model(run / "fcmae_model.safetensors").eval()
    reference = timm_reference(conv.to_timm(run / "fcmae_model.safetensors"), 0)
    hf = check_transformers_equals_timm(folder, reference, batch, 0)
    assert hf.layernorm.eps == 1e-6
    assert hf.encoder.stages[1].layers[0].grn.weight.shape == (1, 1, 1, 320)
    classifier, report = loaded(transformers.ConvNextV2ForImageClassification, folder)
    assert report == {} and isinstance(classifier.classifier, torch.nn.Identity)
    fresh, info = transformers.ConvNextV2ForImageClassification.from_pretrained(str(folder), num_labels=10,
                                                                                output_loading_info=True)
    assert fresh.classifier.out_features == 10 and sorted(info["missing_keys"]) == ["classifier.bias",
                                                                                    "classifier.weight"]
    with torch.no_grad():
        assert rel_err(hf(batch).last_hidden_state, model.encoder(batch)) <= 1e-5  # = our sparse encoder, all visible

    # The image processor makes (nearly) the batch finetune.py evaluates on: same size, crop, mean and std; only
    # the resize kernels differ.
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    pixels = processor(pictures, return_tensors="pt")["pixel_values"]
    assert pixels.shape == batch.shape and (pixels - batch).abs().max() < 0.1

    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and "| mask_ratio | 0.5 |" in card
    assert "pretraining loss" in card and "(pretraining run)" in card

    # The training-state folder of step 2: the checkpoint's own config, and the metrics up to step 2 only.
    ckpt = run / "checkpoints" / "step_00000002"
    export(capsys, ckpt, tmp_path / "hf2", "--to", "transformers")
    card = (tmp_path / "hf2" / "README.md").read_text()
    assert "(pretraining checkpoint)" in card and "at step 2 (epoch" in card and "at step 4" not in card
    check_transformers_equals_timm(tmp_path / "hf2", timm_reference(conv.to_timm(ckpt), 0), batch, 0)


def test_transformers_from_a_fine_tuned_run_keeps_its_classifier_and_labels(runs, tmp_path, capsys):
    source = runs / "ft" / "classifier.safetensors"
    export(capsys, source, tmp_path / "hf", "--to", "transformers")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "fox"} and config["layer_norm_eps"] == 1e-6
    reference = timm.create_model("convnextv2_atto", num_classes=3).eval()
    reference.load_state_dict(safetensors.torch.load_file(str(source)))  # finetune.py's file: strict in timm
    _, batch = images()
    check_transformers_equals_timm(tmp_path / "hf", reference, batch, 3)
    # The base model has no head: the classifier is all it leaves.
    _, report = loaded(transformers.ConvNextV2Model, tmp_path / "hf")
    assert report == {"unexpected_keys": ["classifier.bias", "classifier.weight"]}
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "3-class classifier (cat, dog, fox)" in card and "## Fine-tuning settings" in card
    assert "## Pretraining settings (FCMAE)" in card and "| mask_ratio | 0.5 |" in card  # from the --finetune run
    assert "best top-1 / top-5, raw weights" in card and "pretraining loss" in card

    export(capsys, source, tmp_path / "bare", "--to", "transformers", "--drop-head")
    for cls in (transformers.ConvNextV2Model, transformers.ConvNextV2ForImageClassification):
        assert loaded(cls, tmp_path / "bare")[1] == {}


@pytest.mark.parametrize("me", [True, False])
def test_transformers_from_official_layouts(tmp_path, capsys, me):
    """The official MinkowskiEngine layout (main_pretrain.py's checkpoints) and the released dense layout."""
    model = randomize_(fcmae.create_model("atto", img_size=SIZE, decoder_embed_dim=32), seed=1).eval()
    state = official_state(model.state_dict(), me=me, prefix=me, decoder=me)
    path = save_official(tmp_path / "official.pth", state, wrapped=True)
    export(capsys, path, tmp_path / "hf", "--to", "transformers")
    _, batch = images()
    hf = check_transformers_equals_timm(tmp_path / "hf", timm_reference(conv.to_timm(path), 0), batch, 0)
    with torch.no_grad():
        assert rel_err(hf(batch).last_hidden_state, model.encoder(batch)) <= 1e-5
    assert "license: cc-by-nc-4.0" in (tmp_path / "hf" / "README.md").read_text()


def test_transformers_from_a_timm_file(tmp_path, capsys):
    """timm's own weights, as torch.save writes them (fine-tuned files above are timm safetensors files)."""
    source = randomize_(timm.create_model("convnextv2_atto", num_classes=4), seed=2).eval()
    path = tmp_path / "timm.pth"
    torch.save(source.state_dict(), path)
    export(capsys, path, tmp_path / "hf", "--to", "transformers")
    _, batch = images()
    check_transformers_equals_timm(tmp_path / "hf", source, batch, 4)
    assert "(timm weights)" in (tmp_path / "hf" / "README.md").read_text()


def test_transformers_encoder_config_has_no_label_map(runs, tmp_path, capsys):
    """An encoder without a head: no `id2label` in config.json, so `num_labels=K` adds a K-class head without
    transformers' warning that K "is incompatible to the id2label map of length 0"; without K, no head at all."""
    folder = tmp_path / "hf"
    export(capsys, runs / "pre" / "fcmae_model.safetensors", folder, "--to", "transformers")
    config = json.loads((folder / "config.json").read_text())
    assert "id2label" not in config and "label2id" not in config and config["num_labels"] == 0
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        fresh = transformers.ConvNextV2ForImageClassification.from_pretrained(str(folder), num_labels=10)
        plain, report = loaded(transformers.ConvNextV2ForImageClassification, folder)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert fresh.classifier.out_features == 10 and fresh.config.num_labels == 10
    assert not [r.getMessage() for r in records if "id2label" in r.getMessage()]
    assert isinstance(plain.classifier, torch.nn.Identity) and report == {}


def test_transformers_preprocessing_differs_from_finetune_only_as_the_card_says(runs, tmp_path, capsys):
    """ConvNextImageProcessor crops from margin // 2 where torchvision's CenterCrop rounds margin / 2 half to even:
    one pixel apart when a side's margin is 3 mod 4. The card says so, and it holds on a real 600x400 photo."""
    import torchvision.transforms as T
    from fcmae.data import demo_image_files

    folder = tmp_path / "hf"
    export(capsys, runs / "pre" / "fcmae_model.safetensors", folder, "--to", "transformers")
    card = (folder / "README.md").read_text()
    assert "(margin mod 4 = 3), transformers crops from margin // 2 and torchvision one pixel further" in card
    assert "square images included" in card
    normalize = T.Compose([T.ToTensor(), T.Normalize(timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)])
    coffee = load_rgb(next(f for f in demo_image_files() if f.name == "coffee.png"))
    assert coffee.size == (600, 400)
    for size, margins in ((64, (45, 9)), (96, (67, 13))):  # the resized photo is 109x73 and 163x109 px
        processor = transformers.AutoImageProcessor.from_pretrained(str(folder), size={"shortest_edge": size})
        pixels = processor(coffee, return_tensors="pt")["pixel_values"][0]
        resized = T.Resize(int(size / 0.875), interpolation=T.InterpolationMode.BICUBIC)(coffee)
        assert (resized.width - size, resized.height - size) == margins
        finetune_view = eval_transform((size, size))(coffee)
        left, top = margins[0] // 2, margins[1] // 2  # transformers' crop corner
        floor_crop = normalize(resized.crop((left, top, left + size, top + size)))
        assert (pixels - floor_crop).abs().max() < 0.05  # the resize kernels only
        shifted = (pixels - finetune_view).abs().max().item()
        assert shifted > 3 if any(m % 4 == 3 for m in margins) else shifted < 0.05

    # From 384 px up ConvNextImageProcessor squashes the whole photo to a square: the export says so (an official
    # checkpoint whose args record input_size 384).
    model = randomize_(fcmae.create_model("custom", **SMALL), seed=4).eval()
    path = save_official(tmp_path / "ckpt.pth", official_state(model.state_dict(), me=True), wrapped=True,
                         args=argparse.Namespace(input_size=384, mask_ratio=0.6))
    printed = export(capsys, path, tmp_path / "hf384", "--to", "transformers")
    assert "resizes to 384x384 without a center crop from 384 px up" in printed
    assert "ignores `crop_pct` from 384 px up and resizes the whole image to 384x384" in \
        (tmp_path / "hf384" / "README.md").read_text()
    pixels = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf384"))(coffee, return_tensors="pt")
    squashed = normalize(T.Resize((384, 384), interpolation=T.InterpolationMode.BICUBIC)(coffee))
    assert (pixels["pixel_values"][0] - squashed).abs().max() < 0.05


def folder_text(folder: Path) -> str:
    """Every text an exported folder holds: its JSON and Markdown files and each safetensors file's metadata."""
    texts = [p.read_text() for p in sorted(folder.iterdir()) if p.suffix in (".json", ".md")]
    for weights in folder.glob("*.safetensors"):
        with safetensors.safe_open(str(weights), framework="pt") as f:
            texts.append(json.dumps(f.metadata()))
    return "\n".join(texts)


@pytest.mark.parametrize("to", ["transformers", "timm"])
def test_exported_folders_name_their_sources_by_file_name_and_sha256(runs, tmp_path, capsys, to):
    """Nothing in a folder bound for the Hub says where its sources lay on this machine."""
    source, pretrained = runs / "ft" / "classifier.safetensors", runs / "pre" / "fcmae_model.safetensors"
    export(capsys, source, tmp_path / "ft", "--to", to)
    text = folder_text(tmp_path / "ft")
    assert str(runs) not in text and str(tmp_path) not in text and str(Path.home()) + "/" not in text
    card = (tmp_path / "ft" / "README.md").read_text()
    assert "| input | `classifier.safetensors` (fine-tuning run) |" in card
    assert f"| SHA-256 | `{hashlib.sha256(source.read_bytes()).hexdigest()}` |" in card
    assert f"| finetune | fcmae_model.safetensors (SHA-256 {hashlib.sha256(pretrained.read_bytes()).hexdigest()}) |" \
        in card
    assert "| data_path | labeled |" in card and "| data_path | photos |" in card
    assert "detected timm layout in classifier.safetensors: convnextv2_atto" in card

    # A checkpoint folder: its folder's name and the weights file inside; a file fcmae-convert wrote: its source's name.
    ckpt = runs / "pre" / "checkpoints" / "step_00000002"
    export(capsys, ckpt, tmp_path / "ckpt", "--to", to)
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "| input | `step_00000002/model.safetensors` (pretraining checkpoint) |" in card
    assert f"| SHA-256 | `{hashlib.sha256((ckpt / 'model.safetensors').read_bytes()).hexdigest()}` |" in card
    export(capsys, pretrained, tmp_path / "model.safetensors", "--to", "fcmae")
    export(capsys, tmp_path / "model.safetensors", tmp_path / "again", "--to", to)
    card = (tmp_path / "again" / "README.md").read_text()
    assert "| converted from (source) | fcmae_model.safetensors (SHA-256 " in card
    for folder in ("ckpt", "again"):
        text = folder_text(tmp_path / folder)
        assert str(runs) not in text and str(tmp_path) not in text


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_exported_folder_files_follow_the_umask(runs, tmp_path, capsys, umask):
    """transformers' save_pretrained writes model.safetensors 0600; every file of an export gets the umask's mode."""
    previous = os.umask(umask)
    try:
        for to in ("transformers", "timm"):
            export(capsys, runs / "pre", tmp_path / to, "--to", to)
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / to).iterdir()}
            assert modes and set(modes.values()) == {0o666 & ~umask}, modes
    finally:
        os.umask(previous)


# Hub-ready timm folders -----------------------------------------------------------------------------------------


def test_timm_folder_from_a_pretraining_run_loads_through_local_dir(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = runs / "pre"
    folder = tmp_path / "convnextv2_atto.fcmae"  # a dotted name is still a folder
    printed = export(capsys, run / "fcmae_model.safetensors", folder, "--to", "timm")
    assert f"timm.create_model('local-dir:{folder}', pretrained=True)" in printed
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    assert config["architecture"] == "convnextv2_atto" and config["num_classes"] == 0 and "model_args" not in config
    assert cfg["input_size"] == [3, SIZE, SIZE] and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == list(timm.data.IMAGENET_DEFAULT_MEAN) and cfg["std"] == list(timm.data.IMAGENET_DEFAULT_STD)

    model = fcmae.load_model(run / "fcmae_model.safetensors").eval()
    built = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert built.num_classes == 0 and tuple(timm.data.resolve_data_config(model=built)["input_size"]) == (3, SIZE, SIZE)
    _, batch = images()
    with torch.no_grad():
        assert rel_err(built.forward_features(batch), model.encoder(batch)) <= 1e-5
    headed = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=5)
    assert headed.num_classes == 5 and torch.equal(headed.stem[0].weight, built.stem[0].weight)
    overlay = timm.create_model("convnextv2_atto", pretrained=True, num_classes=0,  # for a timm without local-dir:
                                pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"))).eval()
    with torch.no_grad():
        assert rel_err(overlay.forward_features(batch), model.encoder(batch)) <= 1e-5

    card = (folder / "README.md").read_text()
    assert "library_name: timm" in card and "| input | `fcmae_model.safetensors` (pretraining run) |" in card
    for setting in ("| mask_ratio | 0.5 |", "| input_size | [64] |", "| max_steps | 4 |", "| lr | 0.001 |"):
        assert setting in card
    assert "pretraining loss" in card and "at step 4 (epoch" in card and "output_dir" not in card


def test_timm_folder_from_a_fine_tuned_run_and_a_custom_official_file(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = runs / "ft" / "classifier.safetensors"
    export(capsys, source, tmp_path / "ft", "--to", "timm")
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["num_classes"] == 3 and config["label_names"] == ["cat", "dog", "fox"]
    built = timm.create_model(f"local-dir:{tmp_path / 'ft'}", pretrained=True).eval()
    assert built.pretrained_cfg["label_names"] == ["cat", "dog", "fox"]
    reference = timm.create_model("convnextv2_atto", num_classes=3).eval()
    reference.load_state_dict(safetensors.torch.load_file(str(source)))
    _, batch = images()
    with torch.no_grad():
        assert rel_err(built(batch), reference(batch)) <= 1e-5
    card = (tmp_path / "ft" / "README.md").read_text()
    assert "val_acc1 of the saved weights" in card and "| layer_decay | 0.9 |" in card

    # A custom-size official ME checkpoint: model_args carry the depths, dims and Linear MLP.
    model = randomize_(fcmae.create_model("custom", **SMALL), seed=3).eval()
    path = save_official(tmp_path / "ckpt.pth", official_state(model.state_dict(), me=True), wrapped=True,
                         args=argparse.Namespace(input_size=SIZE, mask_ratio=0.6, epochs=1600))
    export(capsys, path, tmp_path / "custom", "--to", "timm")
    config = json.loads((tmp_path / "custom" / "config.json").read_text())
    assert config["model_args"] == {"depths": [1, 1, 2, 1], "dims": [16, 24, 32, 40], "conv_mlp": False}
    built = timm.create_model(f"local-dir:{tmp_path / 'custom'}", pretrained=True).eval()
    with torch.no_grad():
        assert rel_err(built.forward_features(batch), model.encoder(batch)) <= 1e-5
    card = (tmp_path / "custom" / "README.md").read_text()
    assert "(official pretraining checkpoint)" in card and "| epochs | 1600 |" in card
    assert "license: cc-by-nc-4.0" in card and config["pretrained_cfg"]["license"] == "cc-by-nc-4.0"
    # Through an FCMAE model file first: the file records its official origin, and the license follows it.
    export(capsys, path, tmp_path / "fcmae.safetensors", "--to", "fcmae")
    export(capsys, tmp_path / "fcmae.safetensors", tmp_path / "again", "--to", "timm")
    card = (tmp_path / "again" / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in card and "| converted from (layout) | official-me |" in card


class FakeHub:
    """huggingface_hub.HfApi, recording what an upload would send (no network)."""

    calls: list = []
    fail = False

    def create_repo(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_repo", repo_id, kwargs))
        if FakeHub.fail:
            raise RuntimeError("401 Client Error: Unauthorized\nInvalid token")
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        FakeHub.calls.append(("upload_folder", repo_id, files, kwargs["repo_type"]))


def test_push_to_hub_uploads_the_written_folder(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls, FakeHub.fail = [], False
    printed = export(capsys, runs / "pre", tmp_path / "hf", "--to", "transformers", "--push-to-hub", "me/atto-fcmae")
    assert printed.splitlines()[-1] == "pushed to https://huggingface.co/me/atto-fcmae"
    assert FakeHub.calls == [
        ("create_repo", "me/atto-fcmae", {"repo_type": "model", "private": False, "exist_ok": True}),
        ("upload_folder", "me/atto-fcmae", ["README.md", "config.json", "model.safetensors",
                                            "preprocessor_config.json"], "model")]
    FakeHub.fail = True
    err = one_line_error(capsys, [runs / "pre", tmp_path / "timm", "--to", "timm", "--push-to-hub", "me/x"])
    assert "could not push" in err and "RuntimeError: 401 Client Error: Unauthorized Invalid token" in err
    assert (tmp_path / "timm" / "model.safetensors").is_file()  # the folder is kept
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    err = one_line_error(capsys, [runs / "pre", tmp_path / "t2", "--to", "timm", "--push-to-hub", "me/x"])
    assert "needs huggingface_hub (pip install huggingface_hub); the export is written at" in err


# Feature pyramids and the official layout -----------------------------------------------------------------------


def test_feature_pyramid_from_an_exported_folder(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export(capsys, runs / "pre", tmp_path / "timm", "--to", "timm")
    features = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True, features_only=True).eval()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert features.feature_info.channels() == [40, 80, 160, 320]
    full = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    pictures, _ = images(2)
    batch = torch.stack([eval_transform((SIZE, 96))(p) for p in pictures])  # not square: strides per side
    with torch.no_grad():
        maps = features(batch)
        final, intermediates = full.forward_intermediates(batch)
        x, by_hand = full.stem(batch), []
        for stage in full.stages:  # stage by stage, not through timm's feature code
            x = stage(x)
            by_hand.append(x)
        encoder = fcmae.load_model(runs / "pre" / "fcmae_model.safetensors").encoder.eval()
        assert rel_err(final, encoder(batch)) <= 1e-5
    for stride, channels, ours, theirs, manual in zip((4, 8, 16, 32), (40, 80, 160, 320), maps, intermediates, by_hand):
        assert ours.shape == (2, channels, SIZE // stride, 96 // stride)
        assert torch.equal(ours, theirs) and torch.equal(ours, manual)
    # The same from the plain timm file, through pretrained_cfg_overlay.
    export(capsys, runs / "pre", tmp_path / "w.safetensors", "--to", "timm")
    overlay = timm.create_model("convnextv2_atto", pretrained=True, features_only=True, out_indices=(1, 3),
                                pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors"))).eval()
    with torch.no_grad():
        assert [torch.equal(a, b) for a, b in zip(overlay(batch), maps[1::2])] == [True, True]


class OfficialLayerNorm(torch.nn.LayerNorm):
    """The official LayerNorm over the channels of (N, C, H, W) maps (data_format="channels_first")."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class OfficialGRN(torch.nn.Module):
    """The official dense GRN: gamma and beta (1, 1, 1, C), on (N, H, W, C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = torch.nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        gx = x.norm(p=2, dim=(1, 2), keepdim=True)
        return self.gamma * (x * (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6))) + self.beta + x


class OfficialBlock(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = torch.nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act = torch.nn.Linear(dim, 4 * dim), torch.nn.GELU()
        self.grn, self.pwconv2 = OfficialGRN(4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1))))))
        return x + y.permute(0, 3, 1, 2)


class OfficialConvNeXtV2(torch.nn.Module):
    """The official dense ConvNeXt V2 (models/convnextv2.py), written from its module names and shapes: what the
    official main_finetune.py builds and loads a checkpoint into."""

    def __init__(self, depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), num_classes: int = 1000):
        super().__init__()
        self.downsample_layers = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Conv2d(3, dims[0], 4, stride=4), OfficialLayerNorm(dims[0], eps=1e-6))]
            + [torch.nn.Sequential(OfficialLayerNorm(dims[i], eps=1e-6),
                                   torch.nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)) for i in range(3)])
        self.stages = torch.nn.ModuleList(torch.nn.Sequential(*[OfficialBlock(d) for _ in range(n)])
                                          for n, d in zip(depths, dims))
        self.norm, self.head = torch.nn.LayerNorm(dims[-1], eps=1e-6), torch.nn.Linear(dims[-1], num_classes)

    def feature_map(self, x):
        """(N, 3, H, W) -> (N, C, H/32, W/32): the last stage's output, before the pooling and final norm."""
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return x

    def forward(self, x):
        return self.head(self.norm(self.feature_map(x).mean((-2, -1))))


def official_finetune_remap(checkpoint_model: dict) -> dict:
    """What the official main_finetune.py --finetune does to checkpoint['model'] before loading it, as its source
    documents: drop every key naming 'decoder', 'mask_token', 'proj' or 'pred'; then utils.remap_checkpoint_keys:
    strip a leading `encoder.`, drop the component before the last of keys containing 'ln' or 'linear', turn
    MinkowskiEngine `kernel`s into dense weights (none here: asserted), flatten non-1-D biases, and unsqueeze(0) then
    unsqueeze(1) every tensor whose key contains 'grn'."""
    kept = {k: v for k, v in checkpoint_model.items() if not any(s in k for s in ("decoder", "mask_token", "proj",
                                                                                  "pred"))}
    assert not any(k.endswith("kernel") for k in kept)
    remapped = {}
    for key, value in kept.items():
        parts = key.split(".")[1:] if key.startswith("encoder") else key.split(".")
        if any("ln" in p or "linear" in p for p in parts):
            parts.pop(-2)
        remapped[".".join(parts)] = value
    for key, value in remapped.items():
        if key.endswith("bias") and value.ndim != 1:
            remapped[key] = value.reshape(-1)
        elif "grn" in key:
            remapped[key] = value.unsqueeze(0).unsqueeze(1)
    return remapped


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_export_of_a_pretrained_model_is_what_official_finetune_reads(runs, tmp_path, capsys, suffix):
    """The released convnextv2_*_fcmae.pt layout (GRN (1, 4C)): after the official --finetune remap, it loads into the
    official dense model with nothing mismatched, and gives our encoder's features; fcmae-convert reads it back."""
    source = runs / "pre" / "fcmae_model.safetensors"
    model = fcmae.load_model(source).eval()
    out = tmp_path / f"atto_fcmae{suffix}"
    printed = export(capsys, source, out, "--to", "official").splitlines()
    written = (torch.load(out, weights_only=True)["model"] if suffix == ".pth"
               else safetensors.torch.load_file(str(out)))
    official = OfficialConvNeXtV2().eval()
    missing, unexpected = official.load_state_dict(official_finetune_remap(written), strict=False)  # shapes: strict
    assert sorted(missing) == ["head.bias", "head.weight", "norm.bias", "norm.weight"] and unexpected == []
    _, batch = images()
    with torch.no_grad():
        assert rel_err(official.feature_map(batch), model.encoder(batch)) <= 1e-5
    expected = official_state(model.state_dict(), me=False, prefix=False, decoder=False)  # the tests' own naming
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k].flatten(), v.flatten()) for k, v in expected.items())
    assert written["stages.0.0.grn.gamma"].shape == (1, 160) and written["stages.3.1.grn.beta"].shape == (1, 1280)

    # What the printed lines say the file holds (item: a .safetensors file is a bare state dict).
    if suffix == ".pth":
        assert printed[-2] == f"{out} holds {{'model': state_dict}} in the layout of the released " \
                              "convnextv2_*_fcmae.pt files (downsample_layers.*, stages.*, no decoder; GRN (1, 4C))"
        assert printed[-1].startswith(f"use: the official main_finetune.py --finetune {out} ")
    else:
        assert printed[-2].startswith(f"{out} holds a bare state dict in the layout of the released")
        assert printed[-1].startswith(f"use: safetensors.torch.load_file('{out}');")
        assert "checkpoint['model']" not in "\n".join(printed) and "atto_fcmae.pth" in printed[-1]

    # Read back by our own converter: the same timm weights, and a transformers folder equal to timm.
    again = conv.to_timm(out, conv_mlp=False)
    assert all(torch.equal(again[k], v) for k, v in conv.to_timm(source, conv_mlp=False).items())
    export(capsys, out, tmp_path / "hf", "--to", "transformers")
    check_transformers_equals_timm(tmp_path / "hf", timm_reference(conv.to_timm(source), 0), batch, 0)


def test_official_export_of_a_classifier_is_what_official_resume_reads(runs, tmp_path, capsys):
    """A fine-tuned model keeps the dense layout (GRN (1, 1, 1, 4C)) with `norm` and `head`: the official --resume /
    --eval path loads it strictly and gives timm's logits."""
    source = runs / "ft" / "classifier.safetensors"
    out = tmp_path / "ft.pth"
    printed = export(capsys, source, out, "--to", "official").splitlines()
    assert printed[-1] == f"use: the official main_finetune.py --eval true --resume {out} (a strict load)"
    written = torch.load(out, weights_only=True)["model"]
    assert written["head.weight"].shape == (3, 320) and written["norm.weight"].shape == (320,)
    assert written["stages.0.0.grn.gamma"].shape == (1, 1, 1, 160)
    official = OfficialConvNeXtV2(num_classes=3).eval()
    official.load_state_dict(written)
    reference = timm.create_model("convnextv2_atto", num_classes=3).eval()
    reference.load_state_dict(safetensors.torch.load_file(str(source)))
    _, batch = images()
    with torch.no_grad():
        assert rel_err(official(batch), reference(batch)) <= 1e-5
    again, original = conv.to_timm(out), conv.to_timm(source)
    assert again.keys() == original.keys() and all(torch.equal(again[k], v) for k, v in original.items())


# Bad inputs -----------------------------------------------------------------------------------------------------


def test_bad_export_inputs_end_with_one_line(runs, tmp_path, capsys, monkeypatch):
    source = runs / "pre" / "fcmae_model.safetensors"
    folder = tmp_path / "hf"
    export(capsys, source, folder, "--to", "transformers")
    before = (folder / "model.safetensors").read_bytes()
    assert "hf exists; pass --overwrite" in one_line_error(capsys, [source, folder, "--to", "transformers"])
    export(capsys, runs / "ft" / "classifier.safetensors", folder, "--to", "transformers", "--overwrite")
    assert (folder / "model.safetensors").read_bytes() != before
    assert "holds files no export writes (.fcmae.lock, checkpoints, config.yaml" in one_line_error(
        capsys, [runs / "ft" / "classifier.safetensors", runs / "pre", "--to", "timm", "--overwrite"])
    assert (runs / "pre" / "fcmae_model.safetensors").is_file()
    assert "holds the input" in one_line_error(capsys, [runs / "pre" / "checkpoints" / "step_00000002",
                                                        runs / "pre" / "checkpoints", "--to", "timm", "--overwrite"])
    assert "is a file; this export writes a folder" in one_line_error(capsys, [runs / "pre", source, "--to",
                                                                               "transformers", "--overwrite"])
    assert "invalid choice: 'onnx'" in one_line_error(capsys, [source, tmp_path / "x", "--to", "onnx"])
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    assert "is not a PyTorch or safetensors checkpoint" in one_line_error(capsys, [tmp_path / "notes.pt", tmp_path / "y", "--to",
                                                               "transformers"])
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    assert "no ConvNeXt V2 encoder weights" in one_line_error(capsys, [tmp_path / "foreign.safetensors",
                                                                       tmp_path / "y.pth", "--to", "official"])
    assert "must be a .pth or .pt or .safetensors file" in one_line_error(capsys, [source, tmp_path / "d.bin",
                                                                                   "--to", "official"])
    assert "--conv-mlp applies only to --to timm" in one_line_error(capsys, [source, tmp_path / "z", "--to",
                                                                             "transformers", "--conv-mlp"])
    assert "--push-to-hub uploads a folder" in one_line_error(capsys, [source, tmp_path / "z.safetensors", "--to",
                                                                       "timm", "--push-to-hub", "me/x"])
    with pytest.raises(ValueError, match="--to fcmae into .* is a plain conversion, not an export"):
        fcmae.exports.export(str(source), str(tmp_path / "z"), "fcmae")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    assert "needs the transformers package: pip install" in one_line_error(capsys, [source, tmp_path / "z", "--to",
                                                                                    "transformers"])
    assert not any(p.name.startswith((".z", "z", "y")) for p in tmp_path.iterdir())  # nothing half-written


def test_a_failed_official_write_is_one_line_like_every_other_write(tmp_path, capsys, monkeypatch):
    """Issue 26 item 3: one atomic writer. The official .pth export wrote through a second copy of it, which answered
    a full disk with the raw errno text; now it gives the model file's line and leaves the earlier file intact."""
    import fcmae.exports.official_layout as official_layout

    source = tmp_path / "fcmae_model.safetensors"
    fcmae.save_model(randomized_small_model(), source)
    out = tmp_path / "atto_fcmae.pth"
    export(capsys, source, out, "--to", "official")
    before = out.read_bytes()

    def full_disk(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(official_layout.torch, "save", full_disk)
    assert one_line_error(capsys, [source, out, "--to", "official", "--overwrite"]) == (
        f"error: cannot write {out}: no space left on the device; free some space or choose a folder on another "
        "disk\n")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [out.name, source.name]


def test_an_export_reads_its_input_once(tmp_path, capsys, monkeypatch):
    """Issue 26 item 3: the model card's description took the input's metadata by reading the file again after
    load() (for an official torch checkpoint, a second full torch.load); it now takes what load() returned."""
    import fcmae.checkpoints.torch_file as torch_file

    model = randomize_(fcmae.create_model("custom", **SMALL), seed=3).eval()
    path = save_official(tmp_path / "ckpt.pth", official_state(model.state_dict(), me=True), wrapped=True,
                         args=argparse.Namespace(input_size=96, mask_ratio=0.6, epochs=1600))
    reads = []
    original = torch_file._torch_load  # one call per read of a torch file (it may torch.load twice inside)
    monkeypatch.setattr(torch_file, "_torch_load", lambda file: reads.append(file) or original(file))
    export(capsys, path, tmp_path / "custom", "--to", "timm")
    assert reads == [path]
    card = (tmp_path / "custom" / "README.md").read_text()  # and the card still tells the checkpoint's args
    assert "(official pretraining checkpoint)" in card and "| epochs | 1600 |" in card
    assert json.loads((tmp_path / "custom" / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 96, 96]
