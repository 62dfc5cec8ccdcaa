"""A thread that ends a multi-process job when a process stops making progress, and notices a dead launcher.

A rank that hangs (a stuck file system, a deadlock, `kill -STOP`) leaves every other rank waiting inside a
collective. torch's own process-group timeout ends that wait with a backend traceback (gloo), or aborts the process
(NCCL), and names no rank. Here each process posts a heartbeat, "last finished step, time", to the launcher's
key-value store (fcmae.training.launcher_store) once a second, and whenever it finishes a step. When a step runs
past its allowance, the process reads everyone's heartbeat, names the rank that is behind (or that stopped posting
at all), prints one `error:` line and exits with EXIT_TIMEOUT; the launcher then stops the rest. Nothing saved is
touched: a save cut short leaves only its temp folder, which the next run removes.

Allowances: `timeout` for a training step; `slow_timeout` for the slow phases (the first step of a process,
which may compile, evaluation and checkpoint saves).

Launcher death: torchrun starts ranks in their own sessions, so a launcher killed with SIGKILL leaves them running
and writing. Under a launcher (`accelerate launch`, torchrun) the thread watches the parent process; when it is
gone, the process prints one line and exits at once with EXIT_ORPHANED, without saving: the launcher's store may
have gone with it (so the processes cannot agree on a step to save at), and a save cut short is harmless anyway.
(The main thread may notice first, when its per-step look at the store fails: the same line, exit status 2.)
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Callable

from .launcher_store import connect_launcher_store

__all__ = ["Watchdog", "EXIT_TIMEOUT", "EXIT_ORPHANED", "launched_by_launcher", "orphaned_message"]

EXIT_TIMEOUT = 124  # as timeout(1) exits
EXIT_ORPHANED = 129  # as a process ended by SIGHUP, the signal a terminal sends when its controlling process dies
BEAT_SECONDS = 1.0  # a heartbeat at least this often, and at once when a step ends
POLL_SECONDS = 0.25
STALE_SECONDS = 5.0  # no heartbeat for this long: the process is stopped, or hung with the GIL held


def orphaned_message(rank: int, launcher_pid: int, kept: str) -> str:
    return f"rank {rank}: its launcher (pid {launcher_pid}) exited; ending this process without saving, {kept}"


def launched_by_launcher() -> bool:
    """Started by torchrun (`accelerate launch --multi_gpu`) or accelerate's single-process launcher."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ


class Watchdog(threading.Thread):
    """Start it when training starts; `progress(step, slow)` after each step; `stop()` at the end.

    Args:
        rank, world: this process and the number of processes (the heartbeat and the hang check need world > 1).
        run_id: the run's id, the same on every rank (keys in the shared store are the run's own).
        timeout, slow_timeout: seconds; 0 turns the hang check off.
        launcher_pid: the launcher's pid, taken when the process started (None: not launched, nothing to watch).
        kept: returns what an ending message says was kept (the newest checkpoint).
    """

    def __init__(self, rank: int, world: int, run_id: str, timeout: float, slow_timeout: float,
                 launcher_pid: int | None, kept: Callable[[], str]):
        super().__init__(name="fcmae-watchdog", daemon=True)
        self.rank, self.world, self.run_id = rank, world, run_id
        self.timeout, self.slow_timeout = timeout, slow_timeout
        self.kept = kept
        self.parent = launcher_pid
        self.step, self.since, self.slow = 0, time.monotonic(), True  # the first step is a slow phase (it may compile)
        self._done = threading.Event()
        self._beats = 0
        self._store = connect_launcher_store() if world > 1 else None

    def progress(self, step: int, slow: bool) -> None:
        """The main thread finished `step`; what follows (`slow`: a save, an evaluation) starts its allowance now."""
        self.step, self.since, self.slow = step, time.monotonic(), slow

    def stop(self) -> None:
        """End the thread and wait for it: a thread still inside a store call when the interpreter exits makes the
        C++ runtime abort the process ("terminate called without an active exception")."""
        self._done.set()
        if self.is_alive():
            self.join()

    def run(self) -> None:
        try:
            self._watch()
        finally:
            self._store = None  # closes the connection here, in the thread that used it

    def _watch(self) -> None:
        posted = (-1, 0.0)  # the step and the time of the last heartbeat
        while not self._done.wait(POLL_SECONDS):
            if self.parent is not None and os.getppid() != self.parent:
                self._exit(EXIT_ORPHANED, "error: " + orphaned_message(self.rank, self.parent, self.kept()))
            if self.step != posted[0] or time.monotonic() - posted[1] >= BEAT_SECONDS:
                posted = (self.step, time.monotonic())
                self._beat()
            allowance = self.slow_timeout if self.slow else self.timeout
            if self.world > 1 and allowance > 0 and time.monotonic() - self.since > allowance:
                self._end_job(allowance)

    # The launcher's store ------------------------------------------------------------------------------------------

    def _key(self, rank: int) -> str:
        return f"fcmae/{self.run_id}/beat/{rank}"

    def _beat(self) -> None:
        if self._store is None:
            return
        self._beats += 1  # a counter, not a clock: hosts' clocks differ
        try:
            self._store.set(self._key(self.rank), f"{self.step} {self._beats} {socket.gethostname()} {os.getpid()}")
        except (RuntimeError, OSError):  # the store went away with its launcher
            self._store = None

    def _heartbeats(self) -> dict[int, tuple[int, int, str, str]]:
        """rank -> (last finished step, heartbeat count, host, pid), for the ranks that posted."""
        beats = {}
        for rank in range(self.world):
            try:
                if self._store is not None and self._store.check([self._key(rank)]):
                    step, count, host, pid = self._store.get(self._key(rank)).decode().split()
                    beats[rank] = (int(step), int(count), host, pid)
            except (RuntimeError, OSError, ValueError):
                continue
        return beats

    # Ending the job -----------------------------------------------------------------------------------------------

    def _end_job(self, allowance: float) -> None:
        """Name who is behind, from two readings of the heartbeats STALE_SECONDS apart: a process whose count did
        not move is stopped (or hung holding the GIL); among the others, one that finished fewer steps is stuck."""
        before = self._heartbeats()
        for _ in range(int(STALE_SECONDS / POLL_SECONDS)):
            time.sleep(POLL_SECONDS)
            self._beat()  # this process is alive: keep saying so while the others are read
        beats = self._heartbeats()
        silent = sorted(r for r in range(self.world) if r not in beats or before.get(r, (0, -1))[1] == beats[r][1])
        alive = {r: b for r, b in beats.items() if r not in silent}
        waiting = f"step {self.step + 1}" if not self.slow else f"the phase after step {self.step}"
        if silent and alive:
            cause = "; ".join(_describe(r, beats.get(r)) for r in silent) + ": stopped or hung"
        elif alive and min(b[0] for b in alive.values()) < max(b[0] for b in alive.values()):
            low = min(b[0] for b in alive.values())
            who = ", ".join(f"rank {r} ({b[2]}, pid {b[3]})" for r, b in alive.items() if b[0] == low)
            cause = f"{who} has not finished step {low + 1} while the others have"
        else:
            cause = "no process finished it (all waiting: a hung collective, file system or device)"
        if self._first_to_end():  # one line for the job, from the first process that timed out
            self._exit(EXIT_TIMEOUT, f"error: rank {self.rank} waited {allowance:.0f} s for {waiting}; {cause}. "
                                     f"Ending the job (--timeout / --slow-timeout set the limits); nothing saved was "
                                     f"changed, {self.kept()}")
        time.sleep(2.0)  # let that process print first; the launcher stops everyone once one rank exits
        self._exit(EXIT_TIMEOUT, "")

    def _first_to_end(self) -> bool:
        if self._store is None:
            return True
        try:
            return self._store.compare_set(f"fcmae/{self.run_id}/ending", "", str(self.rank)).decode() == str(self.rank)
        except (RuntimeError, OSError):
            return True

    @staticmethod
    def _exit(status: int, message: str) -> None:
        """End the process now: the main thread may be blocked inside a collective, with no clean way out of it."""
        if message:  # one write: ranks share the launcher's stderr
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
        sys.stdout.flush()
        os._exit(status)


def _describe(rank: int, beat: tuple[int, int, str, str] | None) -> str:
    if beat is None:
        return f"rank {rank} never reported"
    step, _, host, pid = beat
    return (f"rank {rank} ({host}, pid {pid}) has not posted a heartbeat for {STALE_SECONDS:.0f} s "
            f"(last seen at step {step})")
