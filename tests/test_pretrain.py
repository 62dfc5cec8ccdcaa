"""pretrain.py end to end on real photos: learning, exact resume, two processes, bad inputs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from accelerate.state import AcceleratorState

import fcmae
from fcmae.training import Run, end_process_group, run_cli
from helpers import launcher_failure, write_photos

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import pretrain  # noqa: E402

# A small, fast run: atto at 64 px, a narrow decoder, no data-loader workers.
FAST = ["--model", "atto", "--input-size", "64", "--batch-size", "4", "--decoder-embed-dim", "64",
        "--num-workers", "0", "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1", "--vis-every", "0"]


@pytest.fixture
def photos(tmp_path):
    write_photos(tmp_path / "photos", 12, size=96)
    return tmp_path / "photos"


@pytest.fixture(params=["folder", "shards", "gpu-augment"])
def data(request, photos, tmp_path) -> list[str]:
    """The data flags: the photos as a folder, as webdataset shards of 5 (3 shards: batches cross shard
    boundaries), or as a folder with --gpu-augment (decoded and augmented in the step: on the CPU here)."""
    if request.param == "folder":
        return ["--data-path", str(photos)]
    if request.param == "gpu-augment":
        return ["--data-path", str(photos), "--gpu-augment"]
    pytest.importorskip("wids")
    from fcmae.data.shard_writer import write_shards

    write_shards(photos, tmp_path / "shards", maxcount=5)
    return ["--data-path", str(tmp_path / "shards" / "train-{000000..000002}.tar")]


def error_lines(capsys):
    """The lines the run printed to stderr that are not the progress bar."""
    return [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith("train:")]


def run(argv):
    """pretrain.py's main in this process, as the CLI runs it; returns the exit status."""
    try:
        return run_cli(pretrain.main, argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def records(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_real_photos_and_outputs_are_written(photos, tmp_path):
    out = tmp_path / "run"
    argv = FAST + ["--data-path", str(photos), "--output-dir", str(out), "--input-size", "96", "--batch-size", "6",
                   "--max-steps", "40", "--lr", "2e-3", "--log-every", "5", "--save-every", "20", "--vis-every", "20"]
    assert run(argv) == 0
    losses = [r["loss"] for r in records(out)]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05, losses
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000020", "step_00000040"]
    assert sorted(p.name for p in (out / "vis").iterdir()) == ["step_00000020.png", "step_00000040.png"]
    model = fcmae.load_model(out / "fcmae_model.safetensors")
    assert model.config.img_size == (96, 96) and model.config.decoder_embed_dim == 64
    record = records(out)[-1]
    assert set(record) == {"step", "epoch", "loss", "lr", "images_per_s", "skipped_files"}
    assert record["step"] == 40 and record["images_per_s"] > 0 and record["epoch"] == 20.0


def test_exact_resume_is_bit_identical(data, tmp_path, monkeypatch):
    common = FAST + [*data, "--max-steps", "8", "--save-every", "4", "--seed", "3",
                     "--mask-ratio", "0.5"]
    assert run(common + ["--output-dir", str(tmp_path / "straight")]) == 0

    interrupted = tmp_path / "interrupted"
    original_save = Run.save_checkpoint

    def save_then_crash(self, on_save=None):
        path = original_save(self, on_save)
        if self.step == 4:
            raise KeyboardInterrupt  # preempted right after the step-4 checkpoint (mid-epoch: 3 steps per epoch)
        return path

    monkeypatch.setattr(Run, "save_checkpoint", save_then_crash)
    assert run(common + ["--output-dir", str(interrupted)]) == 130
    monkeypatch.setattr(Run, "save_checkpoint", original_save)
    assert [p.name for p in (interrupted / "checkpoints").iterdir()] == ["step_00000004"]
    with (interrupted / "metrics.jsonl").open("a") as f:  # logged after the checkpoint by the crashed run
        f.write(json.dumps({"step": 5, "loss": -1.0}) + "\n\n" + '{"step": 6, "lo')  # and a line cut short
    assert run(common + ["--output-dir", str(interrupted), "--resume", "auto"]) == 0
    assert [r["step"] for r in records(interrupted)] == list(range(1, 9))  # cut back to the checkpoint, resumed

    for name in ["fcmae_model.safetensors", "checkpoints/step_00000008/model.safetensors"]:
        a = safetensors.torch.load_file(tmp_path / "straight" / name)
        b = safetensors.torch.load_file(interrupted / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    opt_a = torch.load(tmp_path / "straight/checkpoints/step_00000008/optimizer.bin", weights_only=True)
    opt_b = torch.load(interrupted / "checkpoints/step_00000008/optimizer.bin", weights_only=True)
    assert all(torch.equal(opt_a["state"][i]["exp_avg"], opt_b["state"][i]["exp_avg"]) for i in opt_a["state"])
    assert [r["loss"] for r in records(tmp_path / "straight")][4:] == [r["loss"] for r in records(interrupted)][4:]


def test_checkpoints_are_pruned_and_incomplete_ones_ignored(photos, tmp_path):
    out = tmp_path / "run"
    base = FAST + ["--data-path", str(photos), "--output-dir", str(out), "--save-every", "2", "--keep-last", "2"]
    assert run(base + ["--max-steps", "6"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    config = fcmae.config.load_yaml(out / "checkpoints" / "step_00000006" / "config.yaml")
    assert config["max_steps"] == 6 and config["keep_last"] == 2
    # A crash mid-save leaves a temporary folder and a folder without trainer_state.json: both are skipped.
    (out / "checkpoints" / ".tmp_step_00000008").mkdir()
    (out / "checkpoints" / "step_00000009").mkdir()
    assert fcmae.training.find_checkpoint(out).name == "step_00000006"
    assert run(base + ["--max-steps", "8", "--resume", "auto"]) == 0
    assert json.loads((out / "checkpoints/step_00000008/trainer_state.json").read_text())["step"] == 8


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(photos, tmp_path, capsys):
    out = tmp_path / "run"
    base = FAST + ["--data-path", str(photos), "--output-dir", str(out), "--save-every", "2", "--keep-last", "2"]
    assert run(base + ["--max-steps", "6"]) == 0
    older = out / "checkpoints" / "step_00000004"
    assert run(base + ["--max-steps", "5", "--resume", str(older)]) == 0
    assert "set aside step_00000006 (later than the step resumed from) as abandoned_step_00000006" in (
        capsys.readouterr().out)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["abandoned_step_00000006", "step_00000004", "step_00000005"]  # kept, pruned: this line only
    assert fcmae.training.find_checkpoint(out).name == "step_00000005"
    assert [r["step"] for r in records(out)][-2:] == [4, 5]

    other = tmp_path / "other"  # another run's checkpoint cannot take over a folder holding a run
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(other), "--max-steps", "2"]) == 0
    before = (other / "fcmae_model.safetensors").read_bytes()
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(other), "--max-steps", "6", "--resume",
                       str(older)]) == 2
    assert "is not one of" in capsys.readouterr().err
    assert (other / "fcmae_model.safetensors").read_bytes() == before


def test_unreadable_files_are_skipped_and_counted(photos, tmp_path, capsys):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    (photos / "empty.png").write_bytes(b"")
    out = tmp_path / "run"
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "9"]) == 0
    # 2 bad files among 14, drawn again in each of the 3 epochs: 2 files, not 6 skips, and one line for each
    assert [r["skipped_files"] for r in records(out)][-1] == 2
    assert capsys.readouterr().err.count("warning: skipped unreadable image ") == 2


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(photos, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    forward_loss = fcmae.FCMAE.forward_loss
    calls = {"n": 0}

    def exploding(self, imgs, pred, mask):
        calls["n"] += 1
        loss = forward_loss(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(fcmae.FCMAE, "forward_loss", exploding)
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "8",
                       "--save-every", "2"]) == 2
    err = error_lines(capsys)
    # The loss of step 5 comes from the weights saved as step 4: that checkpoint is set aside, step 2 is named.
    assert len(err) == 1 and "non-finite (nan) at step 5" in err[0], err
    assert "set aside step_00000004, whose weights gave it, as diverged_step_00000004" in err[0]
    assert f"the newest checkpoint whose weights gave a finite loss is {out / 'checkpoints' / 'step_00000002'}" in err[0]
    assert fcmae.training.find_checkpoint(out).name == "step_00000002"
    assert (out / "checkpoints" / "diverged_step_00000004" / "trainer_state.json").is_file()  # kept, out of the way
    saved = safetensors.torch.load_file(out / "fcmae_model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_real_divergence_names_a_checkpoint_whose_weights_gave_a_finite_loss(photos, tmp_path, capsys):
    """lr 90 blows the weights up for real (losses of 1e17 and more, then nan): the checkpoint saved just before
    the nan already holds the weights that produced it, and must not be the one named as good."""
    out = tmp_path / "run"
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "30", "--lr", "90",
                       "--warmup-steps", "6", "--save-every", "1", "--keep-last", "30"]) == 2
    err = error_lines(capsys)
    bad = int(err[0].split("non-finite (nan) at step ")[1].split(";")[0])
    good = fcmae.training.find_checkpoint(out)
    assert good.name == f"step_{bad - 2:08d}" and str(good) in err[0], err
    assert (out / "checkpoints" / f"diverged_step_{bad - 1:08d}").is_dir()
    losses = {r["step"]: r["loss"] for r in records(out)}
    assert all(map(math.isfinite, losses.values())) and max(losses) == bad - 1  # step bad-1's loss: from good's weights


def test_init_from_a_model_file(photos, tmp_path):
    source = fcmae.create_model("atto", img_size=64, decoder_embed_dim=64)
    fcmae.save_model(source, tmp_path / "init.safetensors")
    out = tmp_path / "run"
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "1", "--lr", "1e-12",
                       "--init-from", str(tmp_path / "init.safetensors")]) == 0
    trained = fcmae.load_model(out / "fcmae_model.safetensors").state_dict()
    close = [torch.allclose(trained[k], v, atol=1e-6) for k, v in source.state_dict().items()]
    assert all(close)

    import timm  # a fine-tuned classifier: its head is left out, its encoder kept
    classifier = timm.create_model("convnextv2_atto", num_classes=5)
    safetensors.torch.save_file(classifier.state_dict(), str(tmp_path / "classifier.safetensors"))
    out = tmp_path / "from_classifier"
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "1", "--lr", "1e-12",
                       "--init-from", str(tmp_path / "classifier.safetensors")]) == 0
    encoder = fcmae.load_model(out / "fcmae_model.safetensors").encoder.state_dict()
    kept = [torch.allclose(encoder[k], v.reshape(encoder[k].shape), atol=1e-6)  # timm's atto MLP: 1x1 convs
            for k, v in classifier.state_dict().items() if k in encoder]
    assert len(kept) == len(encoder) and all(kept)


@pytest.mark.parametrize("extra, message", [
    (["--data-path", "/no/such/folder"], "data path not found or not a folder: /no/such/folder"),
    (["--data-path", "EMPTY"], "no image files"),
    (["--data-path", "PHOTOS", "--input-size", "100"], "input_size must be one or two positive multiples of 32"),
    (["--data-path", "PHOTOS", "--mask-ratoi", "0.5"], "unknown flag --mask-ratoi in the command line; did you mean "
                                                       "--mask-ratio\\?"),
    (["--data-path", "PHOTOS", "--batch-size", "64"], "the dataset is too small for one batch"),
    (["--data-path", "PHOTOS", "--in-chans", "1", "--mean", "0.5", "--std", "0.25"],
     "image has 3 channels, the data config expects 1 \\(--in-chans"),
    (["--data-path", "PHOTOS", "--init-from", "/no/model.safetensors"], "/no/model.safetensors"),
    (["--data-path", "PHOTOS", "--resume", "/no/checkpoint"], "checkpoint not found: /no/checkpoint"),
    (["--data-path", "PHOTOS", "--log-with", "wandb"], "--log-with wandb needs the wandb package"),
])
def test_bad_inputs_end_with_one_line(photos, tmp_path, capsys, extra, message):
    (tmp_path / "empty").mkdir()
    extra = [{"EMPTY": str(tmp_path / "empty"), "PHOTOS": str(photos)}.get(a, a) for a in extra]
    assert run(FAST + ["--output-dir", str(tmp_path / "run"), "--max-steps", "1"] + extra) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: ") and message.split("\\")[0].split(".*")[0] in err[0], err


def test_a_fresh_run_refuses_to_overwrite_checkpoints(photos, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "2"]) == 0
    before = sorted((out / "checkpoints").rglob("*"))
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "2"]) == 2
    assert "already holds a run (checkpoints, fcmae_model.safetensors, metrics.jsonl)" in capsys.readouterr().err
    assert sorted((out / "checkpoints").rglob("*")) == before
    config_before = (out / "config.yaml").read_text()
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "2", "--model",
                       "femto", "--resume", "auto"]) == 2
    assert "is for model convnextv2_atto, not convnextv2_femto" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == config_before  # a failed start writes nothing
    partial = tmp_path / "partial"  # a run that died before its first checkpoint
    partial.mkdir()
    (partial / "metrics.jsonl").write_text('{"step": 1}\n')
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(partial), "--max-steps", "2"]) == 2
    assert "already holds a run (metrics.jsonl)" in capsys.readouterr().err


def test_two_processes_on_cpu(data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "pretrain.py"),
           *FAST, *data, "--output-dir", str(out), "--max-steps", "3"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, launcher_failure(result.stderr)
    assert "2 process(es)" in result.stdout and "effective batch 8 = 4 x 2 x 1" in result.stdout
    lines = records(out)
    assert [r["step"] for r in lines] == [1, 2, 3]  # the main process alone writes metrics
    assert lines[-1]["images_per_s"] > 0
    states = sorted(p.name for p in (out / "checkpoints" / "step_00000003").glob("random_states_*"))
    assert states == ["random_states_0.pkl", "random_states_1.pkl"]


def test_run_cli_ends_the_process_group_on_every_exit(tmp_path):
    """A gloo group left alive at exit can abort the process (SIGABRT) during interpreter shutdown."""

    def start_group_then(error: Exception | None):
        def main(argv):
            store = torch.distributed.FileStore(str(tmp_path / f"store{id(error)}"), 1)
            torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
            if error is not None:
                raise error
        return main

    for error, status in [(None, 0), (ValueError("bad value"), 2)]:
        assert run_cli(start_group_then(error), []) == status
        assert not torch.distributed.is_initialized()
    end_process_group()  # and it is a no-op without a group


def test_tensorboard_tracker_writes_events(photos, tmp_path):
    out = tmp_path / "run"
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "2",
                       "--log-with", "tensorboard"]) == 0
    assert list(out.rglob("events.out.tfevents.*"))
