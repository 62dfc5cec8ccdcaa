"""What a run tells its user, and whether it is true: progress in a log file, where the outputs go, the workers it
starts, a launcher that started fewer processes than asked, the checkpoint of the other script, settings changed on
resume, and commands in hints that work when typed."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fcmae.config import PretrainConfig, parse_config
from fcmae.config.training_configs import default_num_workers
from helpers import launcher_failure, write_photos
from test_pretrain import FAST, ROOT, error_lines, photos, records, run  # noqa: F401 (photos: a fixture)

sys.path.insert(0, str(ROOT))
import finetune  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LINE = re.compile(r"^step (\d+)/(\d+) \(epoch [\d.]+\): loss (\d+\.\d{4}), lr (\S+), [\d.]+ img/s, ETA \d+:\d\d:\d\d$")
FINETUNE_FAST = ["--model", "atto", "--input-size", "64", "--batch-size", "4", "--num-workers", "0", "--lr", "1e-3",
                 "--warmup-steps", "1", "--layer-decay", "0.9", "--layer-decay-type", "single", "--drop-path", "0",
                 "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "", "--log-every", "1"]


def finetune_run(argv):
    from accelerate.state import AcceleratorState

    from fcmae.training import run_cli

    try:
        return run_cli(finetune.main, argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def labeled(tmp_path):
    """Real photos as an ImageFolder root: train/ and val/, two classes each."""
    for split in ("train", "val"):
        for label in ("a", "b"):
            write_photos(tmp_path / "labeled" / split / label, 4, size=96)
    return tmp_path / "labeled"


def test_off_a_terminal_a_line_per_log_step_arrives_while_the_run_goes_on(photos, tmp_path):
    """Under nohup, `| tee` or a batch system, stdout is a file or a pipe: no bar, but a plain line every log_every
    steps, written through at once. The output and TensorBoard folders are named before the first step."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "pretrain.py"), *FAST, "--data-path", str(photos), "--output-dir", str(out),
           "--max-steps", "30", "--log-every", "3", "--warmup-steps", "5", "--log-with", "tensorboard"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=tmp_path)
    seen, running = [], False
    try:
        for line in proc.stdout:
            seen.append(line.rstrip("\n"))
            if line.startswith("step "):
                running = proc.poll() is None  # the line came while the run was still training: not held back
                break
        seen += proc.stdout.read().splitlines()
    finally:
        assert proc.wait(timeout=300) == 0, "\n".join(seen[-40:])
    assert running, seen
    steps = [i for i, line in enumerate(seen) if line.startswith("step ")]
    assert f"output: {out} (config.yaml, metrics.jsonl, checkpoints/)" in seen[: steps[0]], seen
    logdir = out / "fcmae-pretrain"
    assert f"TensorBoard: tensorboard --logdir {logdir}" in seen[: steps[0]], seen
    assert list(logdir.glob("events.out.tfevents.*"))  # the folder named is where the events are
    lines = [LINE.match(seen[i]) for i in steps]
    assert all(lines) and [int(m[1]) for m in lines] == list(range(3, 31, 3)), seen
    assert all(m[2] == "30" for m in lines)
    logged = records(out)
    assert [m[3] for m in lines] == [f"{r['loss']:.4f}" for r in logged]  # the numbers the metrics record
    assert [m[4] for m in lines] == [f"{r['lr']:.2e}" for r in logged]
    assert not any("train:" in line for line in seen)  # and no bar


def test_default_workers_are_the_cores_this_process_may_use(photos, tmp_path, monkeypatch):
    """A process held to one core (taskset, a SLURM CPU set) starts one worker, not 8 with torch's warning that it
    suggests at most 1."""
    at = FAST.index("--num-workers")
    fast = FAST[:at] + FAST[at + 2:]
    out = tmp_path / "run"
    core = min(os.sched_getaffinity(0))
    result = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *fast, "--data-path", str(photos),
                             "--output-dir", str(out), "--max-steps", "1"], capture_output=True, text=True, env=ENV,
                            preexec_fn=lambda: os.sched_setaffinity(0, {core}), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "suggested max number of worker" not in result.stderr, result.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["num_workers"] == 1  # recorded as the number used

    for cores, local_processes, workers in [(range(6), "1", 6), (range(64), "1", 8), (range(16), "4", 4),
                                            (range(2), "8", 1)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=cores: set(cores))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_processes)  # torchrun's processes on this host
        assert default_num_workers() == workers
    assert parse_config(PretrainConfig, ["--data-path", "x", "--num-workers", "3"]).num_workers == 3


def launch(*args, processes: str = "2") -> list[str]:
    """accelerate launch of pretrain.py asked for `processes` processes, without --multi_gpu."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", processes, "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "pretrain.py"), *args]


def test_accelerate_launch_without_multi_gpu_warns_and_the_resume_hint_names_the_launch(photos, tmp_path):
    """Without --multi_gpu, accelerate launch --num_processes 2 runs the script once: the run says so, once. The
    hint to continue a run it finds in its folder is that launch command, which then works as printed."""
    out = tmp_path / "run"
    args = [*FAST, "--data-path", str(photos), "--output-dir", str(out), "--max-steps", "2"]
    result = subprocess.run(launch(*args), capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, launcher_failure(result.stderr)
    warning = ("warning: accelerate launch was asked for 2 processes but started this one alone: without --multi_gpu "
               "it runs the script once")
    assert result.stderr.count(warning) == 1, result.stderr
    assert "1 process(es) on cpu" in result.stdout

    again = subprocess.run(launch(*args), capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode != 0
    hint = re.search(r"to continue it, run (.*); or choose another --output-dir", again.stderr)
    assert hint, again.stderr
    words = shlex.split(hint[1])
    python = sys.executable if words[0] == "python" else words[0]
    assert [python, *words[1:]] == [*launch(*args), "--resume", "auto"]
    resumed = subprocess.run([python, *words[1:-4], "--max-steps", "3", "--resume", "auto"], capture_output=True,
                             text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, launcher_failure(resumed.stderr)
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} at step 2" in resumed.stdout

    one = subprocess.run(launch(*FAST, "--data-path", str(photos), "--output-dir", str(tmp_path / "one"),
                                "--max-steps", "1", processes="1"), capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert one.returncode == 0 and "warning: accelerate launch" not in one.stderr, one.stderr  # as asked: no warning


def test_resuming_the_other_scripts_checkpoint_says_which_it_is_in_one_line(photos, labeled, tmp_path, capsys):
    """pretrain.py given a fine-tuning checkpoint, and finetune.py given a pretraining one, say so first, with or
    without --allow-resume-change (not the batch plan, nor thousands of characters of missing keys); the ways out
    they name work."""
    pre = tmp_path / "pre"
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(pre), "--max-steps", "2"]) == 0
    ft = tmp_path / "ft"
    assert finetune_run(FINETUNE_FAST + ["--data-path", str(labeled), "--output-dir", str(ft), "--max-steps", "2"]) == 0
    assert f"output: {ft} (config.yaml, metrics.jsonl, train_log.jsonl, checkpoints/)" in capsys.readouterr().out
    pre_checkpoint, ft_checkpoint = pre / "checkpoints" / "step_00000002", ft / "checkpoints" / "step_00000002"

    for allow in ([], ["--allow-resume-change"]):
        assert finetune_run(FINETUNE_FAST + ["--data-path", str(labeled), "--output-dir", str(pre), "--max-steps",
                                             "4", "--resume", "auto", *allow]) == 2
        err = error_lines(capsys)
        assert err == [f"error: {pre_checkpoint} is a pretraining checkpoint (an FCMAE model, from pretrain.py), not a "
                       f"fine-tuning one: resume it with pretrain.py, or fine-tune its weights with --finetune "
                       f"{pre_checkpoint} and a new --output-dir"], err

        assert run(FAST + ["--data-path", str(photos), "--output-dir", str(ft), "--max-steps", "4", "--resume",
                           str(ft_checkpoint), *allow]) == 2
        err = error_lines(capsys)
        assert err == [f"error: {ft_checkpoint} is a fine-tuning checkpoint (a classifier, from finetune.py), not a "
                       f"pretraining one: resume it with finetune.py, or start a pretraining from its weights with "
                       f"--init-from {ft_checkpoint} and a new --output-dir"], err

    # The ways out, as named.
    assert finetune_run(FINETUNE_FAST + ["--data-path", str(labeled), "--output-dir", str(tmp_path / "ft2"),
                                         "--max-steps", "1", "--finetune", str(pre_checkpoint)]) == 0
    assert run(FAST + ["--data-path", str(photos), "--output-dir", str(tmp_path / "pre2"), "--max-steps", "1",
                       "--init-from", str(ft_checkpoint)]) == 0


def test_a_changed_input_size_is_refused_or_recorded_and_config_yaml_is_never_rewritten(photos, tmp_path, capsys):
    out = tmp_path / "run"
    base = FAST + ["--data-path", str(photos), "--output-dir", str(out), "--save-every", "2"]
    assert run(base + ["--max-steps", "2"]) == 0
    first = (out / "config.yaml").read_bytes()
    capsys.readouterr()

    assert run(base + ["--max-steps", "4", "--input-size", "96", "--resume", "auto"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "input_size [64] -> [96] since it was saved" in err[0], err
    assert "--allow-resume-change" in err[0]
    assert not (out / "checkpoints" / "step_00000004").exists()

    # Extending the run needs no flag; the change is recorded with its step, config.yaml stays as the run began.
    assert run(base + ["--max-steps", "4", "--resume", "auto"]) == 0
    assert run(base + ["--max-steps", "6", "--input-size", "96", "--resume", "auto", "--allow-resume-change"]) == 0
    assert "changed since that checkpoint: input_size [64] -> [96], max_steps 4 -> 6" in capsys.readouterr().out
    assert (out / "config.yaml").read_bytes() == first
    changes = [json.loads(line) for line in (out / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 2, "checkpoint": "step_00000002", "changes": {"max_steps": [2, 4]}},
                       {"step": 4, "checkpoint": "step_00000004",
                        "changes": {"input_size": [[64], [96]], "max_steps": [4, 6]}}]
    saved = yaml.safe_load((out / "checkpoints" / "step_00000006" / "config.yaml").read_text())
    assert saved["input_size"] == [96]  # each checkpoint keeps the settings it was trained with
    assert [r["step"] for r in records(out)] == list(range(1, 7))

    # Going back to step 4 drops the changes recorded past it, as it drops the metrics.
    assert run(base + ["--max-steps", "5", "--resume", str(out / "checkpoints" / "step_00000004")]) == 0
    changes = [json.loads(line) for line in (out / "config_changes.jsonl").read_text().splitlines()]
    assert [(c["step"], sorted(c["changes"])) for c in changes] == [(2, ["max_steps"]), (4, ["input_size", "max_steps"]),
                                                                  (4, ["max_steps"])]


def test_the_resume_hint_of_a_demo_run_is_a_command_that_works(tmp_path, monkeypatch, capsys):
    """`python pretrain.py` runs the demo; `python pretrain.py --resume auto` would have no data. The hint names the
    demo's config."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "output" / "demo").mkdir(parents=True)
    (tmp_path / "output" / "demo" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert run([]) == 2
    err = error_lines(capsys)
    hint = re.search(r"to continue it, run (.*); or choose another --output-dir", err[0])
    assert len(err) == 1 and hint, err
    words = shlex.split(hint[1])
    assert words[1] == str(ROOT / "pretrain.py") and words[-2:] == ["--resume", "auto"]
    config = parse_config(PretrainConfig, words[2:])  # no "no data given"
    assert (config.data_path, config.output_dir, config.resume, config.max_steps) == ("demo", "output/demo", "auto",
                                                                                       300)


def test_the_resume_hint_repeats_the_flags_given(photos, tmp_path, capsys):
    out = tmp_path / "run"
    argv = FAST + ["--data-path", str(photos), "--output-dir", str(out), "--max-steps", "2"]
    assert run(argv) == 0
    capsys.readouterr()
    assert run(argv) == 2
    words = shlex.split(re.search(r"to continue it, run (.*); or", error_lines(capsys)[0])[1])
    assert words[2:] == [*argv, "--resume", "auto"]
    assert run(words[2:-3] + ["3", "--resume", "auto"]) == 0  # as printed, one step longer
    assert records(out)[-1]["step"] == 3


def test_the_finetune_demos_missing_pretraining_names_a_command_that_works_here(tmp_path, monkeypatch, capsys):
    """Run from another folder, the hint names the pretraining config by a path that exists from there, and that
    config writes the file the demo fine-tunes from."""
    monkeypatch.chdir(tmp_path)
    start = "output/digits-pretrain/fcmae_model.safetensors"
    assert finetune_run(["--config", str(finetune.DEMO_CONFIG), "--finetune", start]) == 2
    err = error_lines(capsys)
    hint = re.search(r"\(the demo starts from: (.*)\)$", err[0])
    assert len(err) == 1 and hint, err
    words = shlex.split(hint[1])
    assert words[1] == str(ROOT / "pretrain.py") and Path(words[3]).is_file()
    config = parse_config(PretrainConfig, words[2:])
    assert Path(config.output_dir) / "fcmae_model.safetensors" == Path(start)


def test_a_non_finite_loss_names_the_command_that_resumes(photos, tmp_path, monkeypatch, capsys):
    import fcmae

    forward_loss, calls = fcmae.FCMAE.forward_loss, {"n": 0}

    def exploding(self, imgs, pred, mask):
        calls["n"] += 1
        loss = forward_loss(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(fcmae.FCMAE, "forward_loss", exploding)
    argv = FAST + ["--data-path", str(photos), "--output-dir", str(tmp_path / "run"), "--max-steps", "6",
                   "--save-every", "1"]
    assert run(argv) == 2
    words = shlex.split(re.search(r"a finite loss is \S+ \((.*) resumes it\)", error_lines(capsys)[0])[1])
    assert words[2:] == [*argv, "--resume", "auto"]
    monkeypatch.setattr(fcmae.FCMAE, "forward_loss", forward_loss)
    assert run(words[2:]) == 0  # from step 2, the newest checkpoint whose weights gave a finite loss
    assert "resumed from" in capsys.readouterr().out and records(tmp_path / "run")[-1]["step"] == 6


def test_resume_hints_replace_a_resume_flag_and_the_launcher_check_reads_the_launchers_words(monkeypatch):
    from fcmae.training import invocation

    again = invocation.Invocation(["python"], "pretrain.py", ["--data-path", "my photos", "--resume", "old",
                                                              "--resume=older", "--max-steps", "9"])
    assert again.resume_auto() == "python pretrain.py --data-path 'my photos' --max-steps 9 --resume auto"

    monkeypatch.setattr(sys, "argv", ["train.py", "--num-processes", "7"])  # the script's own flags do not count
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    words = {"cmdline": ["python", "/venv/bin/accelerate", "launch", "--num-processes=4", "train.py",
                         "--num-processes", "7"], "environ": ["PATH=/bin"]}
    monkeypatch.setattr(invocation, "_parent_words", lambda name: words[name])
    assert "asked for 4 processes but started this one alone" in invocation.launch_mismatch()
    words["environ"].append("MASTER_ADDR=10.0.0.1")  # exported by a job script: the launcher set nothing
    assert invocation.launch_mismatch() == ""
