"""Training-state folders: OUTPUT_DIR/checkpoints/step_XXXXXXXX, written, pruned, found and resumed.

Each folder holds Accelerate's state (model.safetensors, optimizer.bin, scheduler/RNG/sampler states), the run's
config.yaml, any extra modules (e.g. ema.safetensors) and trainer_state.json, written last: a folder without it is
incomplete and ignored. A save goes to a hidden `.tmp_step_N` folder first and is renamed when complete, so a crash
or a full disk mid-save never leaves a half-written checkpoint behind nor touches the previous one.

trainer_state.json records the position in training (the optimizer step) and the facts that give it a meaning:
batch size, processes, accumulation, seed and dataset size fix which images each step saw. `check_position`
refuses to resume when one of them changed, unless the run allows it (then the run continues from the same
point of its epoch, see `Position`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import load_file
from torch import nn

from ..errors import UserError
from . import names
from .model_file import write_safetensors
from .output import OutputError, explain_write_error, file_mode

__all__ = ["Position", "CheckpointStore", "find_checkpoint", "ResumeError"]


class ResumeError(UserError):
    """A checkpoint cannot be resumed by this run; the message names the file or setting and the fix."""


@dataclass(frozen=True)
class Position:
    """What a step means: the optimizer step, and the settings that decide which images it saw.

    `offset` is nonzero only after a resume that changed one of them (allow_resume_change): then the schedule and
    the data order run at `step + offset` (the saved epoch point in the new steps), while `step` keeps counting
    optimizer steps, so checkpoint names and logs never go backwards.
    """

    step: int
    batch_size: int
    processes: int
    accum_steps: int
    seed: int
    images: int
    steps_per_epoch: int
    offset: int = 0

    @property
    def epoch(self) -> float:
        return (self.step + self.offset) / self.steps_per_epoch

    def changes(self, now: "Position") -> list[str]:
        """'batch_size 4 -> 8' for each setting that differs."""
        keys = ("batch_size", "processes", "accum_steps", "seed", "images")
        return [f"{k} {getattr(self, k)} -> {getattr(now, k)}" for k in keys if getattr(self, k) != getattr(now, k)]


def find_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under OUTPUT_DIR/checkpoints, or None."""
    folder = Path(output_dir) / names.CHECKPOINTS
    done = [p for p in folder.glob(names.CHECKPOINT_PREFIX + "*") if (p / names.TRAINER_STATE).is_file()]
    return max(done, key=names.checkpoint_step, default=None)


class CheckpointStore:
    """The checkpoints of one run. `accelerator` writes and reads the training state on every process; the main
    process (`is_main`) writes our files, renames and prunes."""

    def __init__(self, output_dir: Path, accelerator: Any, keep_last: int):
        self.output_dir = Path(output_dir)
        self.folder = self.output_dir / names.CHECKPOINTS
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.keep_last = keep_last

    def find(self) -> Path | None:
        return find_checkpoint(self.output_dir)

    # Saving -------------------------------------------------------------------------------------------------------

    def save(self, position: Position, config_writer: Callable[[Path], None], extra_state: dict[str, nn.Module],
             info: dict[str, Any], skipped_files: int) -> Path:
        """Write the full training state atomically as step_XXXXXXXX and prune to the newest keep_last.

        On failure (a full disk, no permission) the partial folder is removed on every process and the error says
        which checkpoint is intact, or that none is.
        """
        final = self.folder / names.checkpoint_name(position.step)
        tmp = self.folder / f".tmp_{final.name}"
        acc = self.accelerator
        try:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp), safe_serialization=True)
            acc.wait_for_everyone()
            if self.is_main:
                config_writer(tmp / names.RUN_CONFIG)
                for name, module in extra_state.items():
                    write_safetensors(module.state_dict(), tmp / f"{name}.safetensors", {"format": "pt"})
                state = {"step": position.step, "epoch": position.epoch, "position": asdict(position),
                         "skipped_files": skipped_files, "info": info}
                (tmp / names.TRAINER_STATE).write_text(json.dumps(state))  # written last: marks it complete
                for file in tmp.iterdir():  # Accelerate's safetensors files are written 0600 too
                    os.chmod(file, file_mode())
        except (RuntimeError, OSError) as e:  # torch.save reports a full disk as a RuntimeError
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.find()
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            reason = explain_write_error(e, final, "write checkpoint")
            raise OutputError(reason.errno, f"{reason}; {kept}") from None
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.prune()
        acc.wait_for_everyone()
        return final

    def prune(self) -> None:
        """Keep the newest keep_last complete checkpoints."""
        done = sorted((p for p in self.folder.glob(names.CHECKPOINT_PREFIX + "*")
                       if (p / names.TRAINER_STATE).is_file()), key=names.checkpoint_step)
        for old in done[: -self.keep_last]:
            shutil.rmtree(old)

    def set_aside_after(self, step: int, say: Callable[[str], None]) -> None:
        """Resuming from an older checkpoint abandons the later ones. Rename them (abandoned_step_XXXXXXXX) rather
        than delete them: --resume auto and pruning then only see this run's line, and nothing saved is lost."""
        for path in sorted(self.folder.glob(names.CHECKPOINT_PREFIX + "*")):
            if names.checkpoint_step(path) > step:
                target, n = self.folder / f"abandoned_{path.name}", 1
                while target.exists():
                    target, n = self.folder / f"abandoned_{path.name}.{n}", n + 1
                os.replace(path, target)
                say(f"set aside {path.name} (later than the step resumed from) as {target.name}")

    # Resuming -----------------------------------------------------------------------------------------------------

    def open(self, resume: str) -> Path | None:
        """The checkpoint folder --resume names ("auto": the newest, None if there is none yet); checked complete."""
        path = self.find() if resume == "auto" else Path(resume)
        if path is None:
            return None
        if not path.exists():
            raise ResumeError(f"checkpoint not found: {path}")
        if not (path / names.TRAINER_STATE).is_file():
            raise ResumeError(f"not a complete training checkpoint: {path} (no {names.TRAINER_STATE})")
        return path

    def load(self, path: Path, extra_state: dict[str, nn.Module]) -> dict[str, Any]:
        """Restore the Accelerate state and the extra modules from `path`; returns its trainer_state.json."""
        try:
            self.accelerator.load_state(str(path))
        except Exception as e:  # torch, safetensors and Accelerate each raise their own types for a bad file
            detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:3])
            raise ResumeError(f"checkpoint {path} does not match this run or is damaged: {detail}") from None
        for name, module in extra_state.items():
            if not (path / f"{name}.safetensors").is_file():
                raise ResumeError(f"checkpoint {path} has no {name} weights: it was saved without them "
                                  f"(e.g. --no-model-{name}); resume with the settings it was saved with")
            module.load_state_dict(load_file(path / f"{name}.safetensors", device="cpu"))
        try:
            state = json.loads((path / names.TRAINER_STATE).read_text())
            int(state["step"]), state["skipped_files"], state["info"]
        except (ValueError, KeyError, TypeError) as e:
            raise ResumeError(f"checkpoint {path} has a damaged {names.TRAINER_STATE} ({e!r})") from None
        return state


def check_position(path: Path, state: dict[str, Any], saved_config: dict[str, Any], now: Position,
                   allow_change: bool) -> tuple[Position, str]:
    """The position to resume at, and a note; ResumeError if a setting that gives the saved step its meaning
    changed and `allow_change` is off.

    Checkpoints written before trainer_state.json recorded the position are checked against their config.yaml
    (batch size, accumulation, seed). With `allow_change`, the run continues at the saved epoch point in its own
    steps: epoch e + f resumes at step offset round((e + f) * steps_per_epoch) of the schedule and data order.
    """
    step = int(state["step"])
    recorded = state.get("position") or {}
    saved = Position(**{**asdict(now), "step": step, "offset": 0,
                        "batch_size": saved_config.get("batch_size", now.batch_size),
                        "accum_steps": saved_config.get("accum_steps", now.accum_steps),
                        "seed": saved_config.get("seed", now.seed), **recorded})
    changes = saved.changes(now)
    if not changes:
        return Position(**{**asdict(now), "step": step, "offset": saved.offset}), ""
    if not allow_change:
        raise ResumeError(
            f"cannot resume {path}: {', '.join(changes)} since it was saved, which changes which images its step "
            f"{step} stands for; resume with the saved settings, or pass --allow-resume-change to continue from its "
            f"epoch {saved.epoch:.3f} (not bit-exact)")
    target = round(saved.epoch * now.steps_per_epoch)
    moved = Position(**{**asdict(now), "step": step, "offset": target - step})
    return moved, (f"resuming with {', '.join(changes)} (--allow-resume-change): step {step} was epoch "
                   f"{saved.epoch:.3f}; the schedule and data continue from there ({target} of this run's steps)")
