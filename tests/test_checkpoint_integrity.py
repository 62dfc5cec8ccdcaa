"""Checkpoints that fail cleanly and are checked on resume: a real full disk (a small tmpfs) during a save, in one
process and in two; a flipped byte, an empty trainer_state.json and a deleted weights file on resume."""

import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

import fcmae
from fcmae.checkpoints.output import OutputError, explain_write_error
from helpers import FAST, ROOT, error_lines, launcher_failure, records, run_pretrain

PAGE = 4096  # tmpfs counts space in pages


def pages(size: int) -> int:
    return -(-size // PAGE)


@contextlib.contextmanager
def tmpfs(folder: Path, size: int) -> Iterator[Path]:
    """A real file system of `size` bytes mounted at `folder` while the block runs (root only, else skipped)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system (a real full disk) needs root")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs at {folder}: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def resize(folder: Path, free: int) -> None:
    """Shrink the tmpfs at `folder` to what it holds now plus `free` bytes."""
    stats = os.statvfs(folder)
    used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
    subprocess.run(["mount", "-o", f"remount,size={used + free}", str(folder)], check=True)


def fill(folder: Path) -> None:
    """Write a filler file in `folder` until its disk is full."""
    with (folder / "filler").open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * PAGE)


@pytest.fixture
def failed_writes(monkeypatch) -> list[tuple[str, str]]:
    """(file, error type) for each write of Accelerate's two writers (safetensors for the model, torch.save for the
    rest) that raised: which library met the full disk. They are watched, not replaced."""
    import accelerate.utils.other as accelerate_files

    seen: list[tuple[str, str]] = []

    def watched(write):
        def wrapper(obj, f, *args, **kwargs):
            try:
                return write(obj, f, *args, **kwargs)
            except Exception as e:
                seen.append((Path(f).name, type(e).__name__))
                raise
        return wrapper

    monkeypatch.setattr(accelerate_files, "safe_save_file", watched(accelerate_files.safe_save_file))
    monkeypatch.setattr(torch, "save", watched(torch.save))
    return seen


@pytest.mark.parametrize("failing, library", [("model.safetensors", "SafetensorError"),
                                               ("optimizer.bin", "RuntimeError")])
def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_temp_folder(photos, tmp_path, capsys, failed_writes,
                                                                        failing, library):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    # checkpoints/ exists (it is the mount point) before the first run: --resume auto starts it from scratch.
    base = FAST + ["--data-path", str(photos), "--output-dir", str(out), "--save-every", "2", "--resume", "auto"]
    with tmpfs(checkpoints, 256 << 20):
        assert run_pretrain(base + ["--max-steps", "2"]) == 0
        first = checkpoints / "step_00000002"
        sizes = {f.name: f.stat().st_size for f in first.iterdir()}
        # Room for the files Accelerate writes before the failing one, and half of that one.
        before = ["model.safetensors"] if failing == "optimizer.bin" else []
        resize(checkpoints, PAGE * (sum(pages(sizes[n]) for n in before) + pages(sizes[failing]) // 2))
        capsys.readouterr()
        assert run_pretrain(base + ["--max-steps", "4"]) == 2
        err = error_lines(capsys)
        assert failed_writes == [(failing, library)]  # the full disk hit the library this case is about
        assert len(err) == 1, err
        assert err[0] == (f"error: cannot write checkpoint {checkpoints / 'step_00000004'}: no space left on the "
                          f"device; free some space or choose a folder on another disk; the previous checkpoint "
                          f"{first} is intact"), err
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002"]  # no .tmp_ folder left


@pytest.mark.slow
def test_a_full_disk_under_two_processes_ends_every_rank_with_the_same_line(photos, tmp_path):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(steps: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", "29587", "--mixed_precision", "no", "--dynamo_backend",
               "no", str(ROOT / "pretrain.py"), *FAST, "--data-path", str(photos), "--output-dir", str(out),
               "--save-every", "2", "--resume", "auto", "--max-steps", str(steps)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)  # a hang fails the test

    with tmpfs(checkpoints, 256 << 20):
        first = launch(2)
        assert first.returncode == 0, launcher_failure(first.stderr)
        model = checkpoints / "step_00000002" / "model.safetensors"
        resize(checkpoints, PAGE * (pages(model.stat().st_size) // 2))  # rank 0's model write fails
        result = launch(4)
        ranks = launcher_failure(result.stderr)
        assert result.returncode != 0
        errors = [line for line in ranks.splitlines() if line.startswith("error: ")]
        expected = (f"error: cannot write checkpoint {checkpoints / 'step_00000004'}: no space left on the device; "
                    f"free some space or choose a folder on another disk; the previous checkpoint "
                    f"{checkpoints / 'step_00000002'} is intact")
        assert errors == [expected, expected], ranks  # every rank, the same line
        assert "Traceback" not in ranks and "gloo" not in ranks.lower(), ranks
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002"]  # no .tmp_ folder left


def test_the_model_file_write_is_atomic_and_one_line_on_a_full_disk(tmp_path):
    model = fcmae.create_model("atto", img_size=64, decoder_embed_dim=64)
    with tmpfs(tmp_path / "disk", 64 << 20) as disk:
        path = disk / "fcmae_model.safetensors"
        fcmae.save_model(model, path, {"step": "1"})
        fill(disk)
        with pytest.raises(OutputError) as failure:
            fcmae.save_model(model, path, {"step": "2"})
        assert str(failure.value) == (f"cannot write {path}: no space left on the device; free some space or choose "
                                      "a folder on another disk")
        assert sorted(p.name for p in disk.iterdir()) == ["fcmae_model.safetensors", "filler"]  # no temp file
        assert fcmae.load_model(path) is not None  # the earlier file is intact


def test_an_unknown_write_error_on_a_full_disk_is_called_a_full_disk(tmp_path):
    """The rule for wordings we do not know: the free space left where the write failed."""
    unknown = RuntimeError("[enforce fail at some_writer.cc:12] . something went wrong\nmore detail")
    assert str(explain_write_error(unknown, tmp_path / "x")) == (
        f"cannot write {tmp_path / 'x'}: [enforce fail at some_writer.cc:12] . something went wrong")
    with tmpfs(tmp_path / "disk", 1 << 20) as disk:
        fill(disk)
        reason = explain_write_error(unknown, disk / "x")
        assert reason.errno == errno.ENOSPC and "no space left on the device" in str(reason)


def test_a_flipped_byte_is_refused_naming_the_file_and_the_intact_checkpoint(photos, tmp_path, capsys):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    base = FAST + ["--data-path", str(photos), "--output-dir", str(out), "--save-every", "3"]
    assert run_pretrain(base + ["--max-steps", "6"]) == 0
    newest, intact = checkpoints / "step_00000006", checkpoints / "step_00000003"
    state = json.loads((newest / "trainer_state.json").read_text())
    assert set(state["files"]) == {p.name for p in newest.iterdir()} - {"trainer_state.json"}
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    weights.write_bytes(data)
    capsys.readouterr()

    assert run_pretrain(base + ["--max-steps", "9", "--resume", "auto"]) == 2
    err = error_lines(capsys)
    assert err == [f"error: checkpoint {newest} is damaged (model.safetensors does not match the SHA-256 recorded "
                   f"when it was saved); the newest intact one is {intact}: resume from it with --resume {intact}"]

    (checkpoints / ".tmp_step_00000007.deadrun").mkdir()  # what a run killed mid-save leaves
    assert run_pretrain(base + ["--max-steps", "9", "--resume", str(intact)]) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {intact} at step 3" in printed
    assert f"removed {checkpoints / '.tmp_step_00000007.deadrun'}" in printed
    assert [r["step"] for r in records(out)] == list(range(1, 10))
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "abandoned_step_00000006", "step_00000003", "step_00000006", "step_00000009"]


def test_an_empty_state_or_a_missing_weights_file_is_refused_in_one_line(photos, tmp_path, capsys):
    out = tmp_path / "run"
    common = FAST + ["--data-path", str(photos), "--output-dir", str(out), "--save-every", "2"]
    base = common + ["--max-steps", "6", "--resume", "auto"]
    assert run_pretrain(common + ["--max-steps", "4"]) == 0
    newest, intact = out / "checkpoints" / "step_00000004", out / "checkpoints" / "step_00000002"
    advice = f"; the newest intact one is {intact}: resume from it with --resume {intact}"
    state_file = newest / "trainer_state.json"
    saved_state = state_file.read_text()
    capsys.readouterr()

    state_file.write_text("")
    assert run_pretrain(base) == 2
    assert error_lines(capsys) == [f"error: checkpoint {newest} is damaged ({state_file} is empty){advice}"]

    state_file.write_text(saved_state)
    (newest / "model.safetensors").unlink()
    assert run_pretrain(base) == 2
    assert error_lines(capsys) == [f"error: checkpoint {newest} is damaged (model.safetensors is missing){advice}"]

    # Checkpoints saved before the SHA-256 were recorded: the missing file has its own name (Accelerate would say
    # pytorch_model.bin), and an intact one resumes as before.
    for folder in (newest, intact):
        state = json.loads((folder / "trainer_state.json").read_text())
        del state["files"]
        (folder / "trainer_state.json").write_text(json.dumps(state))
    assert run_pretrain(base) == 2
    assert error_lines(capsys) == [f"error: checkpoint {newest} is damaged (model.safetensors is missing){advice}"]
    assert run_pretrain(common + ["--max-steps", "6", "--resume", str(intact)]) == 0
    assert f"resumed from {intact} at step 2" in capsys.readouterr().out
