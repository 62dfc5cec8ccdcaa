"""The loop and the checkpoint store: defects a new user hit (resume changes, full disk, output folders, warnings,
progress bars, host syncs, debug tracebacks, two processes failing together)."""

import errno
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

import fcmae
from fcmae.training import Run, run_cli
from helpers import launcher_failure
from test_pretrain import FAST, ROOT, error_lines, photos, records, run  # noqa: F401 (photos: a fixture)


def test_resume_refuses_a_changed_batch_plan_unless_allowed(photos, tmp_path, capsys):
    out = tmp_path / "run"
    base = FAST + ["--data-path", str(photos), "--output-dir", str(out), "--save-every", "2"]
    assert run(base + ["--max-steps", "4"]) == 0  # 12 photos, batch 4: 3 steps per epoch; saved at step 4
    capsys.readouterr()
    assert run(base + ["--max-steps", "6", "--resume", "auto", "--batch-size", "2"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "batch_size 4 -> 2" in err[0] and "--allow-resume-change" in err[0], err
    assert run(base + ["--max-steps", "6", "--resume", "auto", "--accum-steps", "3"]) == 2
    assert "accum_steps 1 -> 3" in error_lines(capsys)[0]
    assert run(base + ["--max-steps", "6", "--resume", "auto", "--seed", "7"]) == 2
    assert "seed 0 -> 7" in error_lines(capsys)[0]
    assert fcmae.training.find_checkpoint(out).name == "step_00000004"  # nothing was touched

    # Allowed: batch 2 makes 6 steps per epoch; step 4 was epoch 1.333, which is step 8 of the new plan.
    assert run(base + ["--epochs", "2", "--resume", "auto", "--batch-size", "2", "--allow-resume-change"]) == 0
    assert "step 4 was epoch 1.333" in capsys.readouterr().out
    steps = [(r["step"], r["epoch"]) for r in records(out)]
    assert [s for s, _ in steps] == [1, 2, 3, 4, 5, 6, 7, 8]  # the step count goes on, never backwards
    epochs = [e for _, e in steps]
    assert epochs == sorted(epochs) and epochs[-1] == 2.0  # and so does the epoch, to the end of epoch 2
    state = json.loads((out / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["position"]["batch_size"] == 2 and state["position"]["offset"] == 4
    # Resuming that run again with its own plan is exact: no change, the offset is kept.
    assert run(base + ["--epochs", "3", "--resume", "auto", "--batch-size", "2"]) == 0
    assert records(out)[-1]["epoch"] == 3.0


@pytest.mark.parametrize("fail_at", [2, 4])
def test_a_full_disk_during_a_save_cleans_up_and_names_the_intact_checkpoint(photos, tmp_path, capsys, monkeypatch,
                                                                              fail_at):
    out = tmp_path / "run"
    original = fcmae.checkpoints.store.CheckpointStore.save

    def full_disk(self, position, *args):
        if position.step == fail_at:
            real = self.accelerator.save_state

            def partial(folder, **kwargs):
                (tmp_path / "marker").write_text(folder)
                (Path(folder) / "model.safetensors").write_bytes(b"partial")
                raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing "
                                   "file data/0: file write failed")
            monkeypatch.setattr(self.accelerator, "save_state", partial)
            try:
                return original(self, position, *args)
            finally:
                monkeypatch.setattr(self.accelerator, "save_state", real)
        return original(self, position, *args)

    monkeypatch.setattr(fcmae.checkpoints.store.CheckpointStore, "save", full_disk)
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "6",
                       "--save-every", "2"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"cannot write checkpoint {out / 'checkpoints' / f'step_{fail_at:08d}'}" in err[0]
    assert "no space left on the device" in err[0] and "None" not in err[0], err
    if fail_at == 2:
        assert "no earlier checkpoint exists" in err[0]
    else:
        assert f"the previous checkpoint {out / 'checkpoints' / 'step_00000002'} is intact" in err[0]
    assert (tmp_path / "marker").is_file()  # the failure happened mid-save
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == (
        [] if fail_at == 2 else ["step_00000002"])  # no .tmp_ folder left


def test_output_folder_problems_are_one_line_naming_the_path_and_the_fix(photos, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    cases = [(blocker, f"--output-dir {blocker} is a file, not a folder; remove it or choose another --output-dir"),
             (blocker / "run", f"{blocker} (on the way to {blocker / 'run'}) is a file, not a folder")]
    for out, message in cases:
        assert run(FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "1"]) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and message in err[0] and "Errno" not in err[0], err

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(locked / "run"), "--max-steps", "1"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"cannot write in {locked}" in err[0] and "permission denied" in err[0], err
    monkeypatch.setattr(os, "access", real_access)

    def no_space(config, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fcmae.training.run, "save_yaml", no_space)
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(tmp_path / "full"), "--max-steps", "1"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"cannot write in --output-dir {tmp_path / 'full'}: no space left" in err[0], err


def test_an_all_warmup_run_warns_once_and_progress_can_be_turned_off(photos, tmp_path, capsys, monkeypatch):
    """The warning states the schedule the run follows: the warmup cut to the run, the lr the log ends at."""
    out = tmp_path / "run"
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "2", "--warmup-steps",
                       "5", "--save-every", "1", "--log-every", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: all 2 steps are warmup (--warmup-steps 5, shortened to the run): the learning rate "
                     f"only climbs, from 0 to {records(out)[-1]['lr']:.2e} at the end, and never decays") == 1, err
    assert "train:" not in err  # stdout is no terminal here: no progress bar
    # In epochs (12 photos, batch 4: 3 steps each), as fine-tuning's default warmup is given.
    out = tmp_path / "epochs"
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "4", "--warmup-steps",
                       "-1", "--warmup-epochs", "2", "--lr", "3e-3"]) == 0
    lr = records(out)[-1]["lr"]
    assert lr == pytest.approx(3e-3) and (
        f"all 4 steps are warmup (--warmup-epochs 2 = 6 steps, shortened to the run): the learning rate only climbs, "
        f"from 0 to {lr:.2e} at the end") in capsys.readouterr().err

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(tmp_path / "tty"), "--max-steps", "2"]) == 0
    assert "train:" in capsys.readouterr().err  # a terminal: the bar
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(tmp_path / "quiet"), "--max-steps", "2",
                       "--no-progress"]) == 0
    assert "train:" not in capsys.readouterr().err


def test_unreadable_file_warnings_do_not_repeat_every_epoch(photos, tmp_path):
    """Workers start afresh each epoch and meet the file in each; the main process names it once, in a plain line.
    (A process of its own: pytest records what the workers it forks print instead of showing it.)"""
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    result = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *FAST, "--data-path", str(photos),
                             "--output-dir", str(tmp_path / "run"), "--epochs", "4", "--num-workers", "1"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The workers of every epoch meet it; the main process names it once (issue 24 item 10)
    assert result.stderr.count(f"warning: skipped unreadable image {photos / 'broken.jpg'}: ") == 1, result.stderr
    assert "UserWarning" not in result.stderr


def test_the_loop_reads_nothing_from_the_device_per_micro_batch(photos, tmp_path, monkeypatch):
    """Every host read (.item(), .tolist(), float()) our code makes during training is counted: it must not grow
    with the number of steps between log records."""
    repo = str(ROOT)
    counts = {"n": 0}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            # The data pipeline (fcmae/data) reads host tensors it made itself (seeded crop draws), in the loader's
            # workers in real runs: not device syncs, so not counted.
            # Libraries are not ours to count, even in a venv inside the checkout (as .ci/run makes one).
            ours = caller.startswith(repo) and "site-packages" not in caller and "/tests/" not in caller
            if ours and "/fcmae/data/" not in caller:
                counts["n"] += 1
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        counting(name)
    seen = []
    for steps in (3, 9):
        counts["n"] = 0
        out = tmp_path / f"run{steps}"
        assert run(FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", str(steps),
                           "--log-every", "100", "--save-every", "100", "--accum-steps", "2",
                           "--batch-size", "2"]) == 0
        seen.append(counts["n"])
    assert seen[0] == seen[1], seen  # 6 vs 18 micro-batches: the same reads (the final log and checkpoint)


def test_reconstruction_grids_go_to_tensorboard_too(photos, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "2", "--vis-every", "1",
                       "--log-with", "tensorboard"]) == 0
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Images("reconstructions")] == [1, 2]
    assert sorted(p.name for p in (out / "vis").iterdir()) == ["step_00000001.png", "step_00000002.png"]


def test_debugging_keeps_the_cause_of_a_one_line_error(monkeypatch):
    def main(argv):
        try:
            {}["missing"]
        except KeyError:
            raise ValueError("a user-facing message") from None

    assert run_cli(main, []) == 2
    monkeypatch.setenv("FCMAE_DEBUG", "1")
    with pytest.raises(ValueError) as e:
        run_cli(main, [])
    text = "".join(traceback.format_exception(e.value))
    assert "KeyError: 'missing'" in text and "a user-facing message" in text


def test_init_from_prints_the_converters_notes(photos, tmp_path, capsys):
    import timm

    classifier = timm.create_model("convnextv2_atto", num_classes=5)
    import safetensors.torch

    safetensors.torch.save_file(classifier.state_dict(), str(tmp_path / "classifier.safetensors"))
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
                       "--init-from", str(tmp_path / "classifier.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "--init-from: detected timm layout" in out
    assert "--init-from: dropped the classifier head" in out and "initialized a fresh one" in out


def test_a_data_error_under_two_processes_ends_every_rank_with_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "pretrain.py"),
           *FAST, "--data-path", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    ranks = launcher_failure(result.stderr)  # what the ranks printed, without the launcher's own summary
    assert result.returncode != 0
    assert ranks.count(f"error: data path not found or not a folder: {tmp_path / 'nowhere'}") == 2, ranks
    assert "gloo" not in ranks.lower() and "Traceback" not in ranks, ranks
    assert not (tmp_path / "run").exists()


def test_evaluation_has_a_progress_bar(capsys):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from fcmae.evaluation import evaluate

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    batches = [{"image": torch.randn(4, 3, 2, 2), "label": torch.arange(4) % 3, "readable": torch.ones(4, dtype=bool)}
               for _ in range(3)]
    try:
        result = evaluate(model, batches, Accelerator(cpu=True), progress=True)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert result["images"] == 12 and "eval:   0%|          | 0/3" in capsys.readouterr().err
