"""Preemption: SIGTERM or SIGUSR1 asks a run to finish its step, save a checkpoint and exit with EXIT_PREEMPTED.

Clusters stop jobs this way: SLURM, Kubernetes and spot instances send SIGTERM and wait 30-120 s before SIGKILL;
SLURM's `--signal=USR1@120` sends SIGUSR1 ahead of a time limit. The handler only records the request; the loop
acts on it between optimizer steps (`StopSignals.reason`), where the state is consistent, and every process agrees
on the step to stop at (see `Run.stop_requested`).

A second signal ends the process at once, by the signal's default action. A repeat within DUPLICATE_WINDOW seconds
counts as the same request: SLURM signals every process of a job while `accelerate launch` forwards its own copy to
each rank, so a rank can get two SIGTERMs a few milliseconds apart.

DataLoader workers must outlive the signal (SLURM sends it to them too, and a dead worker ends the run before it
saves). They ignore it (`ignore_in_worker`, their worker_init_fn), but torch installs a SIGTERM handler that kills
the worker before that runs, and workers are forked anew every epoch. So while training, the stop signals are
blocked around each fork (os.register_at_fork): a worker starts with them blocked, and unblocks them only once it
ignores them. The training process itself gets them after the fork, or in another of its threads meanwhile.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

__all__ = ["StopSignals", "Preempted", "EXIT_PREEMPTED", "STOP_SIGNALS", "ignore_in_worker"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL, "try again later": a requeue script tests for it
DUPLICATE_WINDOW = 3.0  # seconds within which a repeated signal is the same request, delivered twice


def ignore_in_worker() -> None:
    """In a DataLoader worker: ignore the stop signals, then let them in (a pending one is dropped)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


_forks_guarded = False  # True while a StopSignals is installed
_mask_before_fork: set[int] | None = None


def _block_before_fork() -> None:
    global _mask_before_fork
    if _forks_guarded:
        _mask_before_fork = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _unblock_after_fork() -> None:  # in the parent; the child keeps the mask until ignore_in_worker
    global _mask_before_fork
    if _mask_before_fork is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, _mask_before_fork)
        _mask_before_fork = None


os.register_at_fork(before=_block_before_fork, after_in_parent=_unblock_after_fork)


class Preempted(Exception):
    """The run stopped on request after saving; `message` (main process only, else "") names the checkpoint."""

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.message = message


class StopSignals:
    """Records a stop request from SIGTERM / SIGUSR1 (or `request`, e.g. when the launcher died) while installed.

    Use as a context manager around the training loop: the previous handlers come back on exit. Signal handlers can
    only be set in the main thread; elsewhere (a test calling fit from a thread) nothing is installed.
    """

    def __init__(self) -> None:
        self.reason: str | None = None  # "SIGTERM", "SIGUSR1", or what `request` was told
        self._first = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        global _forks_guarded
        try:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
            _forks_guarded = True
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        global _forks_guarded
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous, _forks_guarded = {}, False

    def request(self, reason: str) -> None:
        """Ask the run to stop at the next step boundary (the first reason given is kept)."""
        if self.reason is None:
            self.reason, self._first = reason, time.monotonic()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # No printing here: a handler can run in the middle of another write to the same stream.
        if self.reason is not None and time.monotonic() - self._first > DUPLICATE_WINDOW:
            signal.signal(signum, signal.SIG_DFL)  # the second request: die now, as the signal would have
            signal.raise_signal(signum)
        self.request(signal.Signals(signum).name)
