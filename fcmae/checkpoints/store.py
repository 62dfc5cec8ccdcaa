"""Training-state folders: OUTPUT_DIR/checkpoints/step_XXXXXXXX, written, pruned, found and resumed.

Each folder holds Accelerate's state (model.safetensors, optimizer.bin, scheduler/RNG/sampler states), the run's
config.yaml, any extra modules (e.g. ema.safetensors) and trainer_state.json, written last: a folder without it is
incomplete and ignored. A save goes to a hidden `.tmp_step_N.RUN_ID` folder first and is renamed when complete, so a
crash or a full disk mid-save never leaves a half-written checkpoint behind nor touches the previous one.

trainer_state.json records the position in training (the optimizer step) and the facts that give it a meaning:
batch size, processes, accumulation, seed and dataset size fix which images each step saw. `check_position`
refuses to resume when one of them changed, unless the run allows it (then the run continues from the same
point of its epoch, see `Position`).

It also records the SHA-256 of every other file in the folder ("files"). Resuming checks them
(`verified_state`): a checkpoint whose file changed or went missing since it was saved (a flipped bit, a copy cut
short) is refused, naming the file and the newest intact checkpoint, instead of training on from damaged weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Collection

from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load_file
from torch import nn

from ..errors import UserError
from . import names
from .model_file import write_safetensors
from .output import OutputError, explain_write_error, file_mode

__all__ = ["Position", "CheckpointStore", "find_checkpoint", "complete_checkpoints", "read_trainer_state",
           "verified_state", "file_hashes", "ResumeError", "DamagedCheckpoint", "check_training_kind",
           "check_trained_settings", "TRAINED_FOR"]

# Settings the saved weights were trained for: a resume refuses a change of one as it refuses a changed batch plan,
# unless allowed (then the run records the change with its step).
TRAINED_FOR = ("input_size",)


class ResumeError(UserError):
    """A checkpoint cannot be resumed by this run; the message names the file or setting and the fix."""


class DamagedCheckpoint(ResumeError):
    """A checkpoint's files are not as they were saved; `problem` names the file and what is wrong with it."""

    def __init__(self, folder: Path, problem: str):
        super().__init__(f"checkpoint {folder} is damaged ({problem})")
        self.folder, self.problem = folder, problem


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
    return (complete_checkpoints(Path(output_dir) / names.CHECKPOINTS) or [None])[-1]


def complete_checkpoints(folder: Path) -> list[Path]:
    """The checkpoint folders in `folder` that hold a trainer_state.json, oldest first."""
    done = [p for p in folder.glob(names.CHECKPOINT_PREFIX + "*") if (p / names.TRAINER_STATE).is_file()]
    return sorted(done, key=names.checkpoint_step)


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json, parsed and checked: the one reader of that file. DamagedCheckpoint,
    naming the file, if it is empty or garbled; OSError if it cannot be read."""
    file = folder / names.TRAINER_STATE
    text = file.read_text()
    if not text.strip():
        raise DamagedCheckpoint(folder, f"{file} is empty")
    try:
        state = json.loads(text)
        int(state["step"]), state["skipped_files"], state["info"]
        if not isinstance(state.get("files", {}), dict):
            raise TypeError("'files' is not a mapping of file names to SHA-256 digests")
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(folder, f"{file} is garbled: {type(e).__name__}: {e}") from None
    return state


def verified_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json, once its files are checked against it; DamagedCheckpoint if one is not.

    Every file the state lists ("files") must be there with the SHA-256 recorded when it was saved. Checkpoints
    saved before the hashes were recorded have no list: they are taken as they are, as long as Accelerate's
    weights file is there (Accelerate itself would report a missing model.safetensors as pytorch_model.bin).
    """
    state = read_trainer_state(folder)
    for name, digest in state.get("files", {}).items():
        if not (folder / name).is_file():
            raise DamagedCheckpoint(folder, f"{name} is missing")
        if _sha256(folder / name) != digest:
            raise DamagedCheckpoint(folder, f"{name} does not match the SHA-256 recorded when it was saved")
    if not any((folder / name).is_file() for name in (names.ACCELERATE_WEIGHTS, names.ACCELERATE_WEIGHTS_PICKLE)):
        raise DamagedCheckpoint(folder, f"{names.ACCELERATE_WEIGHTS} is missing")
    return state


def file_hashes(folder: Path) -> dict[str, str]:
    """The SHA-256 (hex) of every file in a checkpoint folder but trainer_state.json, which records them."""
    return {file.name: _sha256(file) for file in sorted(folder.iterdir())
            if file.is_file() and file.name != names.TRAINER_STATE}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):  # 1 MiB at a time: checkpoint files can be gigabytes
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointStore:
    """The checkpoints of one run. `accelerator` writes and reads the training state on every process; the main
    process (`is_main`) writes our files, renames, prunes and verifies. `run_id`, the same on every process of one
    run, names the run's temp folders, so that no two runs ever write into the same one."""

    def __init__(self, output_dir: Path, accelerator: Any, keep_last: int, run_id: str = ""):
        self.output_dir = Path(output_dir)
        self.folder = self.output_dir / names.CHECKPOINTS
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.keep_last = keep_last
        self.run_id = run_id

    def find(self) -> Path | None:
        return find_checkpoint(self.output_dir)

    # Saving -------------------------------------------------------------------------------------------------------

    def save(self, position: Position, config_writer: Callable[[Path], None], extra_state: dict[str, nn.Module],
             info: dict[str, Any], unreadable: Collection[int]) -> Path:
        """Write the full training state atomically as step_XXXXXXXX and prune to the newest keep_last.

        Three parts, each ended by the processes agreeing on how it went (`_write_part`): the main process makes
        the temp folder; every process writes its share of Accelerate's state into it (rank 0 the model and the
        optimizer, each rank its random_states_i.pkl); the main process adds the config, the extra modules and
        trainer_state.json with the SHA-256 of every other file, and renames the folder. A failure in any part on
        any process (a full disk, no permission; whichever library raised it) removes the temp folder and makes
        every process raise the same one-line OutputError, which says which checkpoint is intact.
        """
        final = self.folder / names.checkpoint_name(position.step)
        tmp = self.folder / (f".tmp_{final.name}.{self.run_id}" if self.run_id else f".tmp_{final.name}")

        def make_temp() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

        def complete() -> None:
            config_writer(tmp / names.RUN_CONFIG)
            for name, module in extra_state.items():
                write_safetensors(module.state_dict(), tmp / f"{name}.safetensors", {"format": "pt"})
            for file in tmp.iterdir():  # Accelerate's safetensors files are written 0600
                os.chmod(file, file_mode())
            state = {"step": position.step, "epoch": position.epoch, "position": asdict(position),
                     "skipped_files": len(unreadable), "unreadable": sorted(unreadable), "info": info,
                     "files": file_hashes(tmp)}
            (tmp / names.TRAINER_STATE).write_text(json.dumps(state))  # written last: marks it complete
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)

        self._write_part(final, tmp, make_temp if self.is_main else None)
        self._write_part(final, tmp, lambda: self.accelerator.save_state(str(tmp), safe_serialization=True))
        self._write_part(final, tmp, complete if self.is_main else None)
        if self.is_main:
            self.prune()
        return final

    def _write_part(self, final: Path, tmp: Path, write: Callable[[], None] | None) -> None:
        """Run this process's `write` (None: it has nothing to write in this part), then learn how the part went on
        every process: they all wait for each other here, and if any failed, each raises that failure's OutputError
        once the main process removed the temp folder. So no process is left waiting at a barrier for one that
        failed (which ends in a gloo traceback, or a hang)."""
        failure: tuple[int, str] | None = None  # (errno, message), the same on every process once agreed on
        cause: Exception | None = None
        if write is not None:
            try:
                write()
            except Exception as e:  # torch, safetensors and Accelerate each raise their own types for a failed write
                cause = e
                reason = explain_write_error(e, final, "write checkpoint")  # while the partial files fill the disk
                failure = (reason.errno, str(reason))
        if self.accelerator.num_processes > 1:
            failure = next((f for f in gather_object([failure]) if f is not None), None)
        if failure is None:
            return
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = self.find()
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise OutputError(failure[0], f"{failure[1]}; {kept}") from cause

    def prune(self) -> None:
        """Keep the newest keep_last complete checkpoints."""
        for old in complete_checkpoints(self.folder)[: -self.keep_last]:
            # trainer_state.json first: a deletion cut short (SIGKILL) leaves an incomplete folder, never one that
            # looks complete without its weights. A failure (NFS's .nfsXXXX files, EBUSY) costs disk space only: a
            # warning, not an error the other processes would never hear of.
            try:
                (old / names.TRAINER_STATE).unlink()
                shutil.rmtree(old)
            except OSError as e:
                print(f"warning: could not remove the old checkpoint {old} ({e.strerror or e}); remove it by hand",
                      file=sys.stderr)

    def remove_stale_temps(self, say: Callable[[str], None]) -> None:
        """Delete the temp folders (.tmp_*) that runs which died mid-save left in checkpoints/, and say so.

        Only for the main process of a run that holds the output folder's lock: then no live run writes one."""
        for tmp in sorted(self.folder.glob(".tmp_*")):
            if tmp.is_dir():
                try:
                    shutil.rmtree(tmp)
                except OSError as e:
                    raise explain_write_error(e, tmp, "remove the stale temp folder") from None
                say(f"removed {tmp}, a checkpoint that a stopped run left half-written")

    def set_aside_after(self, step: int, say: Callable[[str], None]) -> None:
        """Resuming from an older checkpoint abandons the later ones. Rename them (abandoned_step_XXXXXXXX) rather
        than delete them: --resume auto and pruning then only see this run's line, and nothing saved is lost."""
        for path in sorted(self.folder.glob(names.CHECKPOINT_PREFIX + "*")):
            if names.checkpoint_step(path) > step:
                target = self.set_aside(path, names.ABANDONED)
                say(f"set aside {path.name} (later than the step resumed from) as {target.name}")

    def set_aside(self, path: Path, why: str) -> Path:
        """Rename a checkpoint folder to WHY_step_XXXXXXXX (.1, .2, ... if taken), out of --resume auto's and
        pruning's sight, and return the new path."""
        target, n = self.folder / f"{why}_{path.name}", 1
        while target.exists():
            target, n = self.folder / f"{why}_{path.name}.{n}", n + 1
        os.replace(path, target)
        return target

    # Resuming -----------------------------------------------------------------------------------------------------

    def open(self, resume: str) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint --resume names ("auto": the newest complete one; None if there is none yet) and its
        trainer_state.json, once the main process has checked that its files are as they were saved.

        ResumeError on every process if it is missing, incomplete or damaged; for a damaged one, the message names
        the file and the newest intact checkpoint, with the flag that resumes from it.
        """
        verdict: list[Any] = [None, None, None]  # path, trainer state, error: the main process's, for everyone
        if self.is_main:
            try:
                found = self._checked(resume)
                verdict = [str(found[0]), found[1], None] if found else verdict
            except ResumeError as e:
                verdict = [None, None, str(e)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(verdict, from_process=0)
        path, state, error = verdict
        if error is not None:
            raise ResumeError(error)
        return (Path(path), state) if path is not None else None

    def _checked(self, resume: str) -> tuple[Path, dict[str, Any]] | None:
        path = self.find() if resume == "auto" else Path(resume)
        if path is None:
            return None
        if not path.exists():
            raise ResumeError(f"checkpoint not found: {path}")
        if not (path / names.TRAINER_STATE).is_file():
            raise ResumeError(f"not a complete training checkpoint: {path} (no {names.TRAINER_STATE})")
        try:
            return path, verified_state(path)
        except DamagedCheckpoint as e:
            intact = _newest_intact(path.parent, but=path)
            advice = (f"the newest intact one is {intact}: resume from it with --resume {intact}" if intact
                      else f"no intact checkpoint is left in {path.parent}")
            raise ResumeError(f"{e}; {advice}") from None
        except OSError as e:
            raise ResumeError(f"cannot read checkpoint {path}: {e.strerror or e} ({e.filename})") from None

    def load(self, path: Path, extra_state: dict[str, nn.Module]) -> None:
        """Restore the Accelerate state and the extra modules from a checkpoint `open` returned."""
        try:
            self.accelerator.load_state(str(path))
        except Exception as e:  # torch, safetensors and Accelerate each raise their own types for a bad file
            detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:3])
            if len(detail) > 300:  # torch lists every missing and unexpected key: thousands of characters
                detail = detail[:300].rsplit(" ", 1)[0] + f" ... ({len(detail) - 300} more characters)"
            raise ResumeError(f"checkpoint {path} does not match this run or is damaged: {detail}") from None
        for name, module in extra_state.items():
            if not (path / f"{name}.safetensors").is_file():
                raise ResumeError(f"checkpoint {path} has no {name} weights: it was saved without them "
                                  f"(e.g. --no-model-{name}); resume with the settings it was saved with")
            module.load_state_dict(load_file(path / f"{name}.safetensors", device="cpu"))


def _newest_intact(folder: Path, but: Path) -> Path | None:
    """The newest complete checkpoint in `folder`, other than `but`, whose files are as they were saved."""
    for candidate in reversed(complete_checkpoints(folder)):
        if candidate.resolve() != but.resolve():
            try:
                verified_state(candidate)
                return candidate
            except (DamagedCheckpoint, OSError):
                continue
    return None


def training_kind(saved_config: dict[str, Any]) -> str | None:
    """"pretraining" or "fine-tuning" for a checkpoint's config.yaml (pretrain.py's or finetune.py's), None if it
    tells neither. Each script's config has fields the other's lacks."""
    model = saved_config.get("model")
    classifier = isinstance(model, dict) and "num_classes" in model  # a nested ClassifierConfig
    if "num_classes" in saved_config or "finetune" in saved_config or classifier:
        return "fine-tuning"
    if "vis_every" in saved_config or "init_from" in saved_config or isinstance(model, dict):
        return "pretraining"
    return None


def check_training_kind(path: Path, saved_config: dict[str, Any], pretraining: bool) -> None:
    """ResumeError, in one line and before any other check, when a script is asked to resume the other script's
    checkpoint (their settings and weights differ throughout: the batch plan or missing keys would be the wrong
    thing to report)."""
    kind = training_kind(saved_config)
    if kind == "fine-tuning" and pretraining:
        raise ResumeError(f"{path} is a fine-tuning checkpoint (a classifier, from finetune.py), not a pretraining "
                          f"one: resume it with finetune.py, or start a pretraining from its weights with --init-from "
                          f"{path} and a new --output-dir")
    if kind == "pretraining" and not pretraining:
        raise ResumeError(f"{path} is a pretraining checkpoint (an FCMAE model, from pretrain.py), not a fine-tuning "
                          f"one: resume it with pretrain.py, or fine-tune its weights with --finetune {path} and a new "
                          "--output-dir")


def check_trained_settings(path: Path, changes: dict[str, list], allow_change: bool, record: str) -> None:
    """ResumeError if a setting the saved weights were trained for (TRAINED_FOR) changed since `path` was saved and
    `allow_change` is off. `changes`: {"key": [old, new]}; `record`: the file a run records allowed changes in."""
    refused = [f"{key} {old} -> {new}" for key, (old, new) in changes.items() if key in TRAINED_FOR]
    if refused and not allow_change:
        raise ResumeError(f"cannot resume {path}: {', '.join(refused)} since it was saved, and its weights were "
                          "trained with the saved value; resume with the saved settings, or pass --allow-resume-change "
                          f"to go on with the new one (the change is recorded, with its step, in {record})")


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
