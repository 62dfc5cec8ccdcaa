"""How the scripts end: a one-line error for user mistakes (exit 2), a clean exit of every process."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

import torch

from ..checkpoints.folder_lock import FolderLock
from .preemption import EXIT_PREEMPTED, Preempted

__all__ = ["TrainingError", "run_cli", "end_process_group", "debugging", "show_causes"]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says what was kept."""


def debugging() -> bool:
    """FCMAE_DEBUG=1: tracebacks instead of one-line errors."""
    return os.environ.get("FCMAE_DEBUG", "") not in ("", "0")


def show_causes(error: BaseException) -> BaseException:
    """Undo `raise ... from None` along the chain, so a debugging traceback shows the original error too."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        error.__suppress_context__ = False
        error = error.__cause__ or error.__context__
    return error


def print_error(message: str) -> None:
    """Write `error: message` to stderr as one write: the ranks of a multi-process run share the launcher's
    stderr, and print() writes the text and its newline separately, so two ranks' lines could interleave."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a script's main; user errors end with a one-line message and exit status 2 (no traceback); a run
    stopped by SIGTERM / SIGUSR1 after saving exits with EXIT_PREEMPTED (75).

    User errors are bad values, files and folders (ValueError, OSError: missing, unwritable, a file where a folder
    should be) and a run that cannot go on (TrainingError). Set FCMAE_DEBUG=1 to see the traceback anyway, with
    the errors it was raised from.
    """
    try:
        main(argv)
    except (ValueError, OSError, TrainingError) as e:
        if debugging():
            show_causes(e)
            raise
        message = str(e).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: its last line is the error itself
            message = message.splitlines()[-1]
        print_error(message)
        return 2
    except Preempted as e:  # SIGTERM / SIGUSR1: the step's checkpoint is saved
        if e.message:
            print(e.message, file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("interrupted; the last saved checkpoint is intact", file=sys.stderr)
        return 130
    finally:
        FolderLock.release_all()
        end_process_group()
    return 0


def end_process_group() -> None:
    """Destroy the torch.distributed process group, if one is up.

    A process that exits with a gloo group still alive can abort (SIGABRT) while the interpreter shuts down:
    gloo's worker threads still hold finished work objects whose tensors need the GIL. Destroying the group
    first makes the exit clean. Safe to call twice and without a group.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
