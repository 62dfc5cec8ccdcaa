"""How this process was started: the command a hint tells the user to run again, and a launcher that started fewer
processes than it was asked for.

A hint such as "to continue it, run ... --resume auto" must be a command that works as printed. The command is the
user's own: `python SCRIPT ARGS`, or the launcher's command line (`accelerate launch ...`, `torchrun ...`) up to the
script, read from /proc where a launcher started the process. A script run without arguments ran its demo; the
same script with `--resume auto` alone would have no data, so the demo's config file is named instead.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .watchdog import launched_by_launcher

__all__ = ["Invocation", "invocation", "launch_mismatch", "script_command"]

# The launchers' console scripts: a hint names them, not the interpreter that runs them.
LAUNCHER_SCRIPTS = ("accelerate", "accelerate-launch", "torchrun")


@dataclass(frozen=True)
class Invocation:
    """The words of a command: `launcher` (the interpreter, or a launcher and its flags) before the script and its
    `args`; `demo`: the script was given no arguments (args then name the demo's config file)."""

    launcher: list[str]
    script: str
    args: list[str] = field(default_factory=list)
    demo: bool = False

    def resume_auto(self) -> str:
        """The same command with `--resume auto` in place of any --resume it had, quoted for a shell."""
        args, skip = [], False
        for arg in self.args:
            if skip:
                skip = False
            elif arg == "--resume":
                skip = True
            elif not arg.startswith("--resume="):
                args.append(arg)
        return shlex.join([*self.launcher, self.script, *args, "--resume", "auto"])


def invocation(script: str | os.PathLike, argv: Sequence[str] | None = None,
               demo: str | os.PathLike | None = None) -> Invocation:
    """The command that started this run. `script` is the script's file, `argv` the arguments its main got (None:
    this process's own, sys.argv); `demo` the config file the script runs when given no arguments."""
    if argv is None:
        script, argv = sys.argv[0], sys.argv[1:]
    else:
        script = _shown(script)
    demo_run = not argv and demo is not None
    args = ["--config", _shown(demo)] if demo_run else list(argv)
    launcher = _launcher_words(sys.argv[0]) if launched_by_launcher() else None
    return Invocation(launcher or [_python()], str(script), args, demo_run)


def script_command(script: str | os.PathLike, *args: str | os.PathLike) -> str:
    """The command that runs `script` with `args` from the working directory, quoted for a shell (paths inside the
    working directory relative to it)."""
    return shlex.join([_python(), _shown(script), *(_shown(a) if isinstance(a, Path) else str(a) for a in args)])


def launch_mismatch() -> str:
    """A warning when `accelerate launch` was asked for several processes but started this one alone; "" otherwise.

    Without --multi_gpu (and without several GPUs to infer it from) accelerate launch runs the script once whatever
    --num_processes says: its "simple" launcher (accelerate/commands/launch.py, launch_command). That launcher sets
    ACCELERATE_DYNAMO_BACKEND (as every accelerate launch does) but not WORLD_SIZE (torchrun's), and it sets
    MASTER_ADDR / MASTER_PORT only when asked for more than one process or machine (accelerate/utils/launch.py,
    prepare_simple_launcher_cmd_env). The number asked for is read from the launcher's command line where /proc
    shows it; a MASTER_ADDR the launcher itself inherited (a job script's export) says nothing.
    """
    env = os.environ
    if "ACCELERATE_DYNAMO_BACKEND" not in env or "WORLD_SIZE" in env or "MASTER_ADDR" not in env:
        return ""
    inherited = _parent_words("environ")
    if inherited is not None and any(word.startswith("MASTER_ADDR=") for word in inherited):
        return ""
    words = _parent_words("cmdline") or []
    script = sys.argv[0]
    flags = words[: words.index(script)] if script in words else words
    asked = _flag_value(flags, "num_processes")
    if asked == 1:
        return ""  # one process, several machines: each machine's launcher starts its one, as asked
    many = f"{asked} processes" if asked else "several processes (or machines)"
    return (f"warning: accelerate launch was asked for {many} but started this one alone: without --multi_gpu it "
            "runs the script once. Add --multi_gpu (on a machine without GPUs too: the processes then train over "
            "gloo), or leave --num_processes out")


def _flag_value(words: list[str], name: str) -> int | None:
    """The value of --NAME in a launcher's words, spelled with underscores or dashes, as --NAME V or --NAME=V."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    for i, word in enumerate(words):
        flag, eq, value = word.partition("=")
        if flag in spellings:
            value = value if eq else (words[i + 1] if i + 1 < len(words) else "")
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _launcher_words(script: str) -> list[str] | None:
    """The launcher's command line up to `script` (how the launcher was given it), the interpreter left out before a
    launcher's console script; None where it cannot be read."""
    words = _parent_words("cmdline")
    if not words or script not in words[1:]:
        return None
    words = words[: words.index(script, 1)]
    if len(words) > 1 and Path(words[1]).name in LAUNCHER_SCRIPTS:
        return [Path(words[1]).name, *words[2:]]
    return [_python() if words[0] == sys.executable else words[0], *words[1:]]


def _parent_words(name: str) -> list[str] | None:
    """/proc/PPID/NAME (cmdline, environ) split at its NULs; None without /proc (macOS) or where it is unreadable."""
    try:
        data = Path(f"/proc/{os.getppid()}/{name}").read_bytes()
    except OSError:
        return None
    return [word.decode(errors="replace") for word in data.split(b"\0") if word]


def _python() -> str:
    """`python` where that finds this interpreter (an activated venv), else its full path."""
    return "python" if shutil.which("python") == sys.executable else sys.executable


def _shown(path: str | os.PathLike) -> str:
    """A path relative to the working directory where it is inside it (as a user types it), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
