"""What a cluster does to a run, done for real: SIGTERM and SIGUSR1 (preemption), a second run in the same folder,
a stopped rank, a killed launcher, two "machines" with and without a shared output folder."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from helpers import FAST, ROOT, launcher_failure, records, run_pretrain

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"}


def launch_cmd(*args, processes: int = 2, machines: int = 1, machine_rank: int = 0, port: int = 29500) -> list[str]:
    """accelerate launch of pretrain.py on the CPU: `processes` in all, over `machines` (gloo on 127.0.0.1)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", str(machines), "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            str(ROOT / "pretrain.py"), *args]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start a command in a session of its own (as a batch system starts a job), its output going to `log`."""
    out = log.open("w")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT, start_new_session=True)


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Until the run logged `step` (it must still be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early ({proc.returncode}):\n{log.read_text()[-4000:]}"
        try:
            if any(r["step"] >= step for r in records(out)):
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no step {step} after {timeout} s:\n{log.read_text()[-4000:]}")


def ranks_of(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the processes a launcher started (its children, by their RANK variable, read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0") if parent == launcher.pid else []
        except (OSError, IndexError, ValueError):
            continue
        variables = dict(v.decode(errors="replace").split("=", 1) for v in environ if b"=" in v)
        if "RANK" in variables:
            found[int(variables["RANK"])] = int(entry.name)
    return found


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL to whatever is left of the command's session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def same_weights(a: Path, b: Path) -> bool:
    x, y = safetensors.torch.load_file(a), safetensors.torch.load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    return status != "Z"


# Preemption ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_to_every_process_saves_the_step_and_resume_is_bit_identical(photos, tmp_path):
    """As SLURM does on preemption: SIGTERM to every process of the job, data-loader workers included."""
    common = FAST + ["--data-path", str(photos), "--max-steps", "20", "--save-every", "1000", "--seed", "5",
                     "--num-workers", "2"]
    out, log = tmp_path / "stopped", tmp_path / "stopped.log"
    proc = start([sys.executable, str(ROOT / "pretrain.py"), *common, "--output-dir", str(out)], log)
    wait_for_step(out, 3, proc, log)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, log.read_text()[-3000:]
    text = log.read_text()
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0] != "step_00000020", saved  # stopped mid-run, with a checkpoint of its step
    step = int(saved[0].split("_")[1])
    assert f"SIGTERM: saving a checkpoint at step {step}, then stopping" in text
    last = text.strip().splitlines()[-1]
    assert last == (f"stopped at step {step} of 20 (SIGTERM): saved {out / 'checkpoints' / saved[0]}; to continue, "
                    "run the same command with --resume auto"), text[-2000:]
    assert "Traceback" not in text and "DataLoader worker" not in text

    for extra in (["--output-dir", str(out), "--resume", "auto"], ["--output-dir", str(tmp_path / "straight")]):
        finished = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *common, *extra], capture_output=True,
                                  text=True, env=ENV, timeout=300)  # the same threads as the stopped run
        assert finished.returncode == 0, finished.stderr[-3000:]
    assert [r["step"] for r in records(out)] == list(range(1, 21))
    assert same_weights(out / "fcmae_model.safetensors", tmp_path / "straight" / "fcmae_model.safetensors")


@pytest.mark.slow
def test_sigterm_to_the_launcher_of_two_processes_saves_and_resumes_exactly(photos, tmp_path):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 garbage")  # met by both ranks, in every epoch
    (photos / "empty.png").write_bytes(b"")
    common = FAST + ["--data-path", str(photos), "--max-steps", "24", "--save-every", "1000", "--seed", "2"]
    out, log = tmp_path / "stopped", tmp_path / "stopped.log"
    proc = start(launch_cmd(*common, "--output-dir", str(out), port=29531), log)
    wait_for_step(out, 2, proc, log)
    proc.send_signal(signal.SIGTERM)  # the launcher alone: it forwards the signal to both ranks
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0] != "step_00000024", saved
    assert sorted(p.name for p in (out / "checkpoints" / saved[0]).glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]  # both ranks stopped at the same step and saved it
    step = int(saved[0].split("_")[1])
    assert re.search(rf"stopped at step {step} of 24 \(SIGTERM( to rank [01])?\): saved {re.escape(str(out))}",
                     log.read_text()), log.read_text()[-3000:]  # the rank that posted first is named

    resumed = subprocess.run(launch_cmd(*common, "--output-dir", str(out), "--resume", "auto", port=29532),
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, launcher_failure(resumed.stderr)
    straight = subprocess.run(launch_cmd(*common, "--output-dir", str(tmp_path / "straight"), port=29533),
                              capture_output=True, text=True, env=ENV, timeout=300)
    assert straight.returncode == 0, launcher_failure(straight.stderr)
    assert [r["step"] for r in records(out)] == list(range(1, 25))
    assert same_weights(out / "fcmae_model.safetensors", tmp_path / "straight" / "fcmae_model.safetensors")
    assert records(out)[-1]["skipped_files"] == records(tmp_path / "straight")[-1]["skipped_files"] == 2  # files


def test_a_second_signal_ends_the_process_at_once_and_a_duplicate_does_not(tmp_path):
    """StopSignals in a process of its own: a signal delivered twice within the window (the scheduler's copy and
    the launcher's) is one request; a later second one kills the process as the signal's default action does."""
    script = """
import os, signal, sys, time
import fcmae.training.preemption as p
p.DUPLICATE_WINDOW = 0.5
with p.StopSignals() as stop:
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)  # within the window: the same request
    print(stop.reason, flush=True)
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)  # a second request: dies here
    time.sleep(1.0)
    print("still alive", flush=True)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stdout == "SIGUSR1\n" and result.returncode == -signal.SIGTERM, (result.stdout, result.stderr)


# One writer per output folder --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_in_a_live_runs_folder_is_refused_naming_its_process(photos, tmp_path):
    common = FAST + ["--data-path", str(photos), "--save-every", "2"]
    out, log = tmp_path / "run", tmp_path / "first.log"
    first = start([sys.executable, str(ROOT / "pretrain.py"), *common, "--max-steps", "400", "--output-dir",
                   str(out)], log)
    try:
        wait_for_step(out, 2, first, log)
        for extra in ([], ["--resume", "auto"]):  # a second fresh run, and a requeued one beside its old self
            second = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *common, "--max-steps", "4",
                                     "--output-dir", str(out), *extra], capture_output=True, text=True, env=ENV,
                                    timeout=120)
            assert second.returncode == 2, second.stderr[-2000:]
            assert second.stderr.count("\n") == 1, second.stderr
            assert second.stderr.startswith(f"error: {out} is in use by another run (pid {first.pid} on "), second.stderr
        steps = [r["step"] for r in records(out)]
        assert steps == list(range(1, len(steps) + 1))  # one run's records, in order
    finally:
        kill_session(first)  # dies without a word, holding the lock, maybe mid-save
    (out / "checkpoints" / ".tmp_step_00000099.deadbeef").mkdir()  # a dead run's temp folder
    # the lock is stale: the run takes it over
    assert run_pretrain(common + ["--max-steps", "6", "--output-dir", str(out), "--resume", "auto"]) == 0
    assert not list((out / "checkpoints").glob(".tmp_*"))


@pytest.mark.slow
def test_two_runs_started_at_once_in_one_folder_one_is_refused(photos, tmp_path):
    out = tmp_path / "run"
    cmds = [[sys.executable, str(ROOT / "pretrain.py"), *FAST, "--data-path", str(photos), "--max-steps", "30",
             "--seed", str(seed), "--output-dir", str(out)] for seed in (1, 2)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
             for cmd in cmds]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert refused.count("\n") == 1 and (" is in use by another run (pid " in refused
                                         or "already holds a run" in refused), refused
    winner = [seed for (code, _), seed in zip(results, (1, 2)) if code == 0][0]
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == winner
    assert [r["step"] for r in records(out)] == list(range(1, 31))


# Hung peers and dead launchers ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_with_one_line_naming_it(photos, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(launch_cmd(*FAST, "--data-path", str(photos), "--max-steps", "400", "--save-every", "2",
                            "--timeout", "6", "--output-dir", str(out), port=29541), log)
    try:
        wait_for_step(out, 3, proc, log)
        ranks = ranks_of(proc)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGSTOP)
        began = time.monotonic()
        code = proc.wait(timeout=120)
        waited = time.monotonic() - began
    finally:
        kill_session(proc)
    text = launcher_failure(log.read_text())
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1, text
    assert "rank 0 waited 6 s for step" in errors[0] and "rank 1 (" in errors[0] and \
        f"pid {ranks[1]}) has not posted a heartbeat for" in errors[0], errors
    assert "nothing saved was changed, the newest checkpoint is" in errors[0]
    assert waited < 60  # 6 s, the heartbeat's staleness and the launcher's teardown: not torch's 30 minutes
    newest = max((out / "checkpoints").glob("step_*"))
    assert (newest / "trainer_state.json").is_file()


@pytest.mark.slow
def test_killing_the_launcher_ends_its_ranks(photos, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(launch_cmd(*FAST, "--data-path", str(photos), "--max-steps", "400", "--save-every", "2",
                            "--output-dir", str(out), port=29551), log)
    wait_for_step(out, 2, proc, log)
    ranks = ranks_of(proc)
    assert sorted(ranks) == [0, 1], ranks
    proc.kill()  # SIGKILL: the launcher cannot pass anything on
    proc.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in ranks.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in ranks.values()), "orphaned ranks kept running"
    text = log.read_text()
    assert "its launcher (pid" in text and "exited; ending this process without saving" in text, text[-3000:]
    steps = [r["step"] for r in records(out)]
    time.sleep(2)
    assert [r["step"] for r in records(out)] == steps  # nothing writes any more


# Many nodes ------------------------------------------------------------------------------------------------------------


def two_machines(args: list[str], port: int, tmp_path: Path, wrap: list[str] | None = None) -> list[subprocess.Popen]:
    """Start machine ranks 0 and 1, one process each, over gloo on 127.0.0.1; machine 1's command may be wrapped.
    Their output goes to tmp_path/machine{0,1}-PORT.log."""
    procs = []
    for machine in (0, 1):
        cmd = launch_cmd(*args, processes=2, machines=2, machine_rank=machine, port=port)
        procs.append(start([*wrap, *cmd] if machine == 1 and wrap else cmd, tmp_path / f"machine{machine}-{port}.log"))
    return procs


def finished(procs: list[subprocess.Popen], port: int, tmp_path: Path) -> list[tuple[int, str]]:
    """(exit status, output) of each machine once it ends."""
    return [(p.wait(timeout=300), (tmp_path / f"machine{m}-{port}.log").read_text()) for m, p in enumerate(procs)]


@pytest.mark.slow
def test_two_machines_preempted_then_resumed_on_a_shared_folder(photos, tmp_path):
    """SIGTERM to machine 0's launcher: its rank asks, machine 1's rank follows at the same step, both save."""
    common = FAST + ["--data-path", str(photos), "--max-steps", "12", "--save-every", "1000", "--seed", "4"]
    out = tmp_path / "shared"
    procs = two_machines(common + ["--output-dir", str(out)], 29561, tmp_path)
    wait_for_step(out, 2, procs[0], tmp_path / "machine0-29561.log")
    procs[0].send_signal(signal.SIGTERM)
    (code0, log0), (code1, log1) = finished(procs, 29561, tmp_path)
    assert code0 == 128 + signal.SIGTERM and code1 != 0, (log0[-3000:], log1[-3000:])
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0] != "step_00000012", saved
    assert sorted(p.name for p in (out / "checkpoints" / saved[0]).glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert "(SIGTERM): saved" in log0 and "Traceback" not in launcher_failure(log1)

    for name, extra, port in (("shared", ["--resume", "auto"], 29562), ("straight", [], 29563)):
        results = finished(two_machines(common + ["--output-dir", str(tmp_path / name), *extra], port, tmp_path), port,
                           tmp_path)
        assert [code for code, _ in results] == [0, 0], [launcher_failure(text) for _, text in results]
    assert [r["step"] for r in records(out)] == list(range(1, 13))
    assert same_weights(out / "fcmae_model.safetensors", tmp_path / "straight" / "fcmae_model.safetensors")


@pytest.mark.slow
def test_machines_that_do_not_share_the_output_folder_are_refused(photos, tmp_path):
    """Node-local disks, for real: machine 1 runs in a mount namespace where --output-dir is another folder."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs root and unshare -m to give machine 1 a folder of its own at the same path")
    out, local = tmp_path / "out", tmp_path / "node1-local"
    out.mkdir()
    local.mkdir()
    wrap = ["unshare", "-m", "sh", "-c", f'mount --bind "{local}" "{out}" && exec "$@"', "sh"]
    procs = two_machines(FAST + ["--data-path", str(photos), "--max-steps", "2", "--output-dir", str(out)], 29571,
                         tmp_path, wrap)
    results = finished(procs, 29571, tmp_path)
    assert all(code != 0 for code, _ in results)
    for _, text in results:
        errors = [line for line in launcher_failure(text).splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"--output-dir {out} is not shared between the nodes: rank 1 on " in errors[0], text
        assert "storage that every node mounts at the same path" in errors[0]
    assert not (out / "checkpoints").exists() and not (local / "checkpoints").exists()


# The SLURM example ---------------------------------------------------------------------------------------------------


def test_the_slurm_example_parses_and_launches_as_the_readme_says():
    script = ROOT / "scripts" / "slurm" / "pretrain.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for directive in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --nodes="):
        assert directive in text
    launch = [line.strip().removesuffix("&").strip() for line in text.splitlines()
              if "accelerate launch" in line and not line.startswith("#")]  # run in the background there
    assert len(launch) == 1
    readme = (ROOT / "docs" / "cluster.md").read_text()
    assert launch[0] in readme, launch[0]
