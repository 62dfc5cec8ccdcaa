"""`Run`: one training run's setup around the loop (fcmae.training.loop) and its checkpoint store.

It owns the Accelerator (processes, devices, mixed precision), the batch plan and the learning-rate schedule,
the output folder and its logs, and hands saving and resuming to `fcmae.checkpoints.store.CheckpointStore`.
A script supplies the model, optimizer, data loader and a `step_fn(model, batch) -> (loss, images)`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import secrets
import shlex
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, broadcast_object_list, set_seed
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm.auto import tqdm

from ..checkpoints import names
from ..checkpoints.folder_lock import FolderLock
from ..checkpoints.output import check_output_folder, explain_write_error
from ..checkpoints.store import CheckpointStore, Position, check_position, check_trained_settings, check_training_kind
from ..config import ConfigError, TrainConfig, from_dict, load_yaml, save_yaml
from ..config.model import FCMAEConfig
from ..errors import TrainingError
from .batch_size import find_batch_size
from .compilation import compile_once
from .invocation import Invocation, launch_mismatch
from .launcher_store import connect_launcher_store
from .preemption import StopSignals, ignore_in_worker
from .shared_folder import check_shared_folder
from .watchdog import Watchdog, launched_by_launcher, orphaned_message

__all__ = ["Run", "processes_without_gpu", "configure_cuda", "main_process_first", "quiet_worker"]

T = TypeVar("T")

# OUTPUT_DIR's record of the settings a resume changed, one JSON line each: {"step", "checkpoint", "changes":
# {"key": [old, new]}}. config.yaml keeps the settings the run started with: it is never rewritten on a resume.
CONFIG_CHANGES = "config_changes.jsonl"


def processes_without_gpu() -> bool:
    """Several processes but no GPU (e.g. `accelerate launch --multi_gpu` on a laptop): Accelerate must be told
    to use the CPU, then it runs DDP over gloo."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def main_process_first(accelerator: Accelerator, fn: Callable[[], T], others: bool = True) -> T | None:
    """fn() on the main process, then on the others (e.g. "digits:FOLDER" is written once; others=False: on the
    main process only, the others get None). If it fails on the main process with a user error, every process
    raises that error: none is left waiting at a barrier whose peer has gone (which ends in a gloo traceback)."""
    failure: list[Any] = [None]
    result = None
    if accelerator.is_main_process:
        try:
            result = fn()
        except (ValueError, OSError) as e:
            failure = [(type(e), str(e))]
            if accelerator.num_processes == 1:
                raise
    if accelerator.num_processes > 1:
        broadcast_object_list(failure, from_process=0)  # the barrier: the others wait for the main process here
        if failure[0] is not None:
            kind, message = failure[0]
            try:
                error = kind(message)
            except TypeError:  # an error type with other arguments
                error = ValueError(message)
            raise error from None
        if others and not accelerator.is_main_process:
            result = fn()
    return result


def quiet_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: workers start afresh each epoch, so a warning about a file (e.g. unreadable)
    would repeat every epoch; after the first epoch it is not shown again (the skipped_files count keeps them)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and getattr(info.dataset, "epoch", 0) > 0:
        warnings.simplefilter("ignore", UserWarning)
    # A cluster that preempts a job signals every process in it, workers included. A worker that died of it would
    # end the run before it could save; the worker exits anyway once its parent is gone (torch's worker watchdog).
    ignore_in_worker()


class Run:
    """One training run: build it from a config, `prepare` the objects, then `fit(run, step_fn)`.

    Args:
        config: the resolved config; saved to OUTPUT_DIR/config.yaml and into every checkpoint.
        project: tracker project name.
        step_log: file in OUTPUT_DIR that gets a JSON record every log_every steps.
        command: the command that started the run (fcmae.training.invocation), named by the hints to resume it.

    Attributes a script may fill before `fit`: `extra_state` (name -> module whose state dict is saved as
    NAME.safetensors in every checkpoint and restored on resume, e.g. an EMA model) and `info` (JSON values kept
    in every checkpoint's trainer_state.json and restored on resume, e.g. the best accuracy so far).

    `step` counts optimizer steps; `at` (= step, unless a resume changed the batch plan) is where the schedule
    and the data order stand.
    """

    def __init__(self, config: TrainConfig, project: str, step_log: str = names.METRICS,
                 command: Invocation | None = None):
        self.config = config
        self.command = command
        self.output_dir = Path(config.output_dir)
        precision = config.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("mixed precision fp16 needs a CUDA GPU (its grad scaler); use bf16 on a CPU")
        self.accelerator = Accelerator(
            cpu=processes_without_gpu(),
            mixed_precision=config.mixed_precision or None,  # None: accelerate launch's --mixed_precision
            gradient_accumulation_steps=config.accum_steps,
            log_with=config.log_with or None,
            project_dir=str(self.output_dir),
            # The same shuffled order for every run of an epoch: resume can skip into it. Batches from pinned
            # memory are copied without blocking the host.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed,
                                                      non_blocking=torch.cuda.is_available()),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=process_group_timeout(config)),
                             DistributedDataParallelKwargs(bucket_cap_mb=config.ddp_bucket_mb)],
        )
        if self.accelerator.device.type == "cuda":
            configure_cuda()
        self.is_main = self.accelerator.is_main_process
        mismatch = launch_mismatch()
        if mismatch:
            self.print(mismatch, file=sys.stderr)
        # One id for this run on every process: its temp folders and its keys in the launcher's store.
        run_id = [f"{os.getpid()}-{secrets.token_hex(4)}"]
        self.launcher_store = None
        if self.accelerator.num_processes > 1:
            broadcast_object_list(run_id, from_process=0)
            self.launcher_store = connect_launcher_store()
        self.run_id = run_id[0]
        self.launcher_pid = os.getppid() if launched_by_launcher() else None  # watched while training
        self.stop_at: tuple[int, str] | None = None  # (step, why), once a process asked to stop
        self.store = CheckpointStore(self.output_dir, self.accelerator, config.keep_last, run_id=self.run_id)
        self.lock = FolderLock(self.output_dir)
        self.signals = StopSignals()
        exists = [self.output_dir.is_dir()]  # the main process's view decides, so every process does the same
        if self.accelerator.num_processes > 1:
            broadcast_object_list(exists, from_process=0)
        if exists[0]:  # a second run into a live run's folder is refused before any setup work
            self.hold_output_dir()
        self.main_process_first(self._check_output_dir, others=False)
        self.newest_checkpoint: Path | None = None  # saved or resumed by this run: what an ending message names
        set_seed(config.seed)
        self.step = self.offset = 0
        self.unreadable: set[int] = set()  # dataset positions of the files found unreadable (skipped_files)
        self.extra_state: dict[str, nn.Module] = {}
        self.info: dict[str, Any] = {}
        self.project = project
        self.metrics_path = self.output_dir / step_log
        self.config_changes: dict[str, list] = {}  # setting -> [old, new]: what this resume changed
        self.logs = [self.metrics_path, self.output_dir / names.METRICS, self.output_dir / CONFIG_CHANGES]  # cut back
        self.show_progress = config.progress and self.is_main and sys.stdout.isatty()
        # Without a bar (a log file, nohup, SLURM, --no-progress) a plain line every log_every steps says how it goes.
        self.progress_lines = self.is_main and not self.show_progress

    @property
    def at(self) -> int:
        return self.step + self.offset

    def main_process_first(self, fn: Callable[[], T], others: bool = True) -> T | None:
        return main_process_first(self.accelerator, fn, others)

    def print(self, *args: Any, file=None) -> None:
        """Print on the main process only, above the progress bar if there is one."""
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args), file=file)
            (file or sys.stdout).flush()  # a log file (nohup, tee, SLURM) gets the line now, not at exit

    def progress_bar(self, **kwargs) -> tqdm:
        """A tqdm bar on the main process, unless --no-progress or stdout is not a terminal (a log file)."""
        return tqdm(disable=not self.show_progress, dynamic_ncols=True, **kwargs)

    # Setup ------------------------------------------------------------------------------------------------------

    def hold_output_dir(self) -> None:
        """Take the output folder's lock on the main process (creating the folder), for the rest of the process.
        FolderInUse on every process if another run holds it. Then temp folders left by dead runs go."""

        def take() -> None:
            if not self.lock.held:
                check_output_folder(self.output_dir)
                self.lock.acquire()
                self.store.remove_stale_temps(self.print)

        self.main_process_first(take, others=False)

    def _check_output_dir(self) -> None:
        """A folder we can write to, and never another run's checkpoints to overwrite (and later prune)."""
        check_output_folder(self.output_dir, create=False)
        outputs = [names.CHECKPOINTS, *names.RUN_MODELS, names.METRICS]
        existing = [name for name in outputs if (self.output_dir / name).exists()]
        resume = self.config.resume
        if existing and not resume:
            raise ConfigError(
                f"{self.output_dir} already holds a run ({', '.join(existing)}); to continue it, run "
                f"{self.resume_command()}; or choose another --output-dir"
            )
        if existing and resume and resume != "auto" and (
                Path(resume).resolve().parent != self.store.folder.resolve()):
            raise ConfigError(
                f"--resume {resume} is not one of {self.output_dir}'s checkpoints, and {self.output_dir} already "
                f"holds a run ({', '.join(existing)}); continue it in its own output dir, or choose an empty "
                "--output-dir"
            )
        for tracker in self.config.log_with:
            if importlib.util.find_spec(tracker) is None:
                raise ConfigError(f"--log-with {tracker} needs the {tracker} package: pip install {tracker}")

    def open_output_dir(self) -> None:
        """Before anything is written: hold the folder's lock (checking again what it holds, since another run may
        have finished in it meanwhile) and make sure every node sees it."""
        self.hold_output_dir()
        self.main_process_first(self._check_output_dir, others=False)
        if self.accelerator.num_processes > 1:
            check_shared_folder(self.accelerator, self.output_dir, self.run_id)

    def plan_batches(self, num_images: int) -> None:
        """Before `base_lr` and `prepare`: turn config.effective_batch_size (if set) into accum_steps for this many
        processes and training images (drop_last batches), and say what was chosen."""
        processes = self.accelerator.num_processes
        accum, note = self.config.effective_accum_steps(processes, num_images // (self.config.batch_size * processes))
        self.config.accum_steps = accum
        self.accelerator.gradient_accumulation_steps = accum
        if note:
            self.print(note)

    def choose_batch_size(self, trial: Callable[[int], None], num_images: int) -> None:
        """For `--batch-size auto`, before the loader is built: the batch of the checkpoint being resumed, or the
        largest that fits the device (`fcmae.training.batch_size`; trial(size) runs one forward and backward).
        Sets config.batch_size and says what was chosen."""
        if not self.config.auto_batch:
            return
        resumed = self._resumed_batch_size()
        if resumed:
            self.config.batch_size = resumed
            self.print(f"batch size auto: {resumed} per process, as the checkpoint being resumed trained")
            return
        self.config.batch_size, note = find_batch_size(trial, self.accelerator, self.config.effective_batch_size,
                                                       num_images)
        self.print(note)

    def _resumed_batch_size(self) -> int | None:
        """The batch size in the config.yaml of the checkpoint --resume names, if it can be read."""
        if not self.config.resume:
            return None
        path = self.store.find() if self.config.resume == "auto" else Path(self.config.resume)
        try:
            saved = load_yaml(path / names.RUN_CONFIG).get("batch_size") if path else None
        except (OSError, ConfigError):  # resume() itself names what is wrong with the checkpoint
            return None
        return saved if isinstance(saved, int) and not isinstance(saved, bool) else None

    def compile_once(self, warm_up: Callable[[], None]) -> None:
        """warm_up() (one compiled step) on the main process first, then on the others, which load its graph from
        the cache (see fcmae.training.compilation)."""
        compile_once(self.accelerator, warm_up)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader,
                place_batches: bool = True):
        """Wrap model, optimizer and loader for the processes and devices; sets the schedule's length.
        place_batches=False leaves the loader's batches on the host (the step moves them, e.g. --gpu-augment's
        JPEG bytes, which nvjpeg reads from host memory)."""
        self.model, self.optimizer, self.loader = self.accelerator.prepare(
            model, optimizer, loader, device_placement=[None, None, None if place_batches else False])
        config = self.config
        # Accelerate steps the optimizer at the end of every epoch, after a partial accumulation too.
        self.steps_per_epoch = math.ceil(len(self.loader) / config.accum_steps)
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the dataset is too small for one batch: {len(loader.dataset)} images, batch size "
                f"{config.batch_size} x {self.accelerator.num_processes} processes; lower --batch-size"
            )
        self.num_images = len(loader.dataset)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        warmup = config.warmup_steps if config.warmup_steps >= 0 else round(config.warmup_epochs * self.steps_per_epoch)
        self.warmup_steps = min(warmup, self.total_steps)
        self.warmup_warning = ""  # printed once, when the run really starts
        if 0 < self.total_steps <= warmup:
            # The warmup is cut to the run: the lr climbs to the full base lr at the last step (the logs' last lr).
            asked = (f"--warmup-steps {config.warmup_steps}" if config.warmup_steps >= 0 else
                     f"--warmup-epochs {config.warmup_epochs:g} = {warmup} steps")
            cut = "shortened to the run" if warmup > self.total_steps else "as long as the run"
            self.warmup_warning = (f"warning: all {self.total_steps} steps are warmup ({asked}, {cut}): the learning "
                                   f"rate only climbs, from 0 to {self.base_lr():.2e} at the end, and never decays; "
                                   "lower --warmup-epochs / --warmup-steps or train longer")
        cosine_log = logging.getLogger("timm.scheduler.cosine_lr")
        level = cosine_log.level
        cosine_log.setLevel(logging.ERROR)  # its "no effect" warning for all-warmup runs: ours above says more
        try:
            self.scheduler = CosineLRScheduler(
                self.optimizer, t_initial=max(self.total_steps - self.warmup_steps, 1), lr_min=config.min_lr,
                warmup_t=self.warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
            )  # fmt: skip
        finally:
            cosine_log.setLevel(level)
        return self.model, self.optimizer, self.loader

    @property
    def effective_batch_size(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes * self.config.accum_steps

    def base_lr(self) -> float:
        """lr, or blr * effective batch / 256 (ConfigError above MAX_LR: see TrainConfig.base_lr)."""
        return self.config.base_lr(self.effective_batch_size)

    def describe(self) -> str:
        """Processes, effective batch, lr and schedule length: what a run prints before it starts."""
        config, acc = self.config, self.accelerator
        lr = f"{self.base_lr():.3e}"
        lr += " (given)" if config.lr else f" = blr {config.blr:g} x {self.effective_batch_size} / 256"
        return (f"{acc.num_processes} process(es) on {acc.device}, mixed precision {acc.mixed_precision}; "
                f"effective batch {self.effective_batch_size} = {config.batch_size} x {acc.num_processes} x "
                f"{config.accum_steps}; lr {lr}; {self.total_steps} steps, {self.warmup_steps} warmup, "
                f"{self.steps_per_epoch} per epoch")

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # Checkpoints and logs -----------------------------------------------------------------------------------------

    @property
    def position(self) -> Position:
        return Position(step=self.step, batch_size=self.config.batch_size, processes=self.accelerator.num_processes,
                        accum_steps=self.config.accum_steps, seed=self.config.seed, images=self.num_images,
                        steps_per_epoch=self.steps_per_epoch, offset=self.offset)

    def resume(self) -> None:
        """Load the checkpoint named by config.resume ("auto": the newest in output_dir, if any)."""
        if not self.config.resume:
            return
        opened = self.store.open(self.config.resume)  # checked complete and intact, on every process
        if opened is None:
            self.print(f"--resume auto: no checkpoint in {self.store.folder} yet, starting from scratch")
            return
        path, state = opened
        saved = load_yaml(path / names.RUN_CONFIG)
        check_training_kind(path, saved, pretraining=isinstance(self.config.model, FCMAEConfig))  # before the rest
        saved_model = saved.get("model")  # the model: section, or a name (configs written before models nested)
        saved_name = saved_model.get("name") if isinstance(saved_model, dict) else saved_model
        if saved_name != self.config.model.name:
            raise ConfigError(f"checkpoint {path} is for model {saved_name}, not {self.config.model.name}")
        position, note = check_position(path, state, saved, self.position, self.config.allow_resume_change)
        changes = self._changes_since(saved)
        check_trained_settings(path, changes, self.config.allow_resume_change, CONFIG_CHANGES)
        self.store.load(path, self.extra_state)
        self.step, self.offset = position.step, position.offset
        self.unreadable, self.info = set(state.get("unreadable", [])), state["info"]
        if note:
            self.print(note)
        self.newest_checkpoint = path
        self.config_changes = changes
        self.print(f"resumed from {path} at step {self.step}")
        if changes:
            listed = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items())
            self.print(f"changed since that checkpoint: {listed} (recorded in {self.output_dir / CONFIG_CHANGES}; "
                       "config.yaml keeps the settings the run started with)")

    def _changes_since(self, saved: dict[str, Any]) -> dict[str, list]:
        """The settings that differ from a checkpoint's config.yaml, as {"key": [old, new]} ("model.key" for the
        model's), --resume and --allow-resume-change themselves left out. The saved config is read as this run's
        config class first, so that an older layout of the same settings is no change."""
        try:
            saved = from_dict(type(self.config), saved, source="the checkpoint's config.yaml").to_dict()
        except (ValueError, TypeError):  # a config from another version of the code: compared as it is
            pass
        old, new = _settings(saved), _settings(self.config.to_dict())
        return {key: [old.get(key), new.get(key)] for key in sorted(old.keys() | new.keys())
                if key not in ("resume", "allow_resume_change") and old.get(key) != new.get(key)}

    def save_checkpoint(self, on_save: Callable[[Path], None] | None = None) -> Path:
        """Write the full training state to checkpoints/step_XXXXXXXX atomically and keep the newest keep_last."""
        final = self.store.save(self.position, lambda path: save_yaml(self.config, path), self.extra_state,
                                self.info, self.unreadable)
        self.newest_checkpoint = final
        if on_save is not None:  # e.g. the model file; a failure there (a full disk) ends every process alike
            self.main_process_first(lambda: on_save(final), others=False)
        elif self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()
        return final

    @contextlib.contextmanager
    def supervised(self) -> Iterator[Watchdog]:
        """While training: stop signals recorded (see `stop_requested`), and the watchdog that ends a job whose
        processes stopped making progress or whose launcher died. The output folder's lock is released on the way
        out."""
        config = self.config
        watchdog = Watchdog(self.accelerator.process_index, self.accelerator.num_processes, self.run_id,
                            config.timeout, config.slow_timeout, self.launcher_pid, kept=self._kept)
        try:
            with self.signals:
                watchdog.start()
                yield watchdog
        finally:
            watchdog.stop()
            self.lock.release()

    def stop_requested(self) -> str | None:
        """Why the run must stop after this step (a signal to any of its processes), the same on every process at
        the same step; None to go on.

        With several processes, through the launcher's store (no collective, no device sync), in two phases. Every
        process posts its step ("at/RANK") and then looks for a "stopping" note. The first process asked to stop
        posts that note (compare-and-set: one wins), then reads every process's step and posts "final", one past
        the largest. A process that finds the note waits for "final" and stops there. None can be past it: whoever
        looked before the note was posted is at most one step further on when it looks again, and its step was
        read after the note. (Hosts run ahead of the device under NCCL, so steps differ across processes.)
        """
        reason = self.signals.reason
        if self.accelerator.num_processes == 1:
            return reason
        if self.stop_at is None:
            self.stop_at = self._agree_on_stop(reason)
        if self.stop_at is None or self.step < self.stop_at[0]:
            return None
        return self.stop_at[1]

    def _agree_on_stop(self, reason: str | None) -> tuple[int, str] | None:
        store, rank, world = self.launcher_store, self.accelerator.process_index, self.accelerator.num_processes
        if store is None:  # no store to post to: an all-reduce of the flag, which waits for the device
            flag = torch.tensor([reason is not None], device=self.accelerator.device)
            if not self.accelerator.reduce(flag, reduction="sum").item():
                return None
            return self.step, reason or "a stop signal to another process"
        key = f"fcmae/{self.run_id}/stop"
        try:
            store.set(f"{key}/at/{rank}", str(self.step))
            if reason is not None:
                note = store.compare_set(f"{key}/stopping", "", f"{rank} {reason}").decode()
                if note.split(" ", 1)[0] == str(rank):  # this process posts where everyone stops
                    steps = [int(store.get(f"{key}/at/{r}")) if store.check([f"{key}/at/{r}"]) else 0
                             for r in range(world)]  # 0: a process still in its first step (compiling, say)
                    store.set(f"{key}/final", str(max(steps) + 1))
            elif not store.check([f"{key}/stopping"]):
                return None
            note = store.get(f"{key}/stopping").decode()
            final = int(store.get(f"{key}/final"))  # waits until the poster has posted it
        except (RuntimeError, OSError) as e:  # the store's host is gone: most often with the launcher it ran in
            if self.launcher_pid is not None and os.getppid() != self.launcher_pid:
                raise TrainingError(orphaned_message(rank, self.launcher_pid, self._kept())) from None
            raise TrainingError(f"rank {rank} lost the launcher's store ({str(e).strip().splitlines()[0]}), where the "
                                f"processes agree where to stop; ending without saving, {self._kept()}") from None
        poster, why = note.split(" ", 1)
        return final, why if int(poster) == rank else f"{why} to rank {poster}"

    def resume_command(self) -> str:
        """The command that continues this run: the one that started it, with --resume auto."""
        return self.command.resume_auto() if self.command else "the same command with --resume auto"

    def stop_message(self, reason: str, checkpoint: Path) -> str:
        """The line a stopped run ends with (main process; "" on the others)."""
        if not self.is_main:
            return ""
        again = "the same command with --resume auto"  # the command itself where that alone would not do (a demo)
        if self.command is not None and self.command.demo:
            again = self.resume_command()
        return (f"stopped at step {self.step} of {self.total_steps} ({reason}): saved {checkpoint}; to continue, "
                f"run {again}")

    def _kept(self) -> str:
        """From memory, not the file system: the watchdog calls it when that file system may be what hangs."""
        newest = self.newest_checkpoint
        return f"the newest checkpoint is {newest}" if newest else "no checkpoint had been saved by this run yet"

    def start(self) -> None:
        """Write the run's config and open the trackers: only once everything has been checked and loaded."""
        if self.is_main:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                run_config = self.output_dir / names.RUN_CONFIG
                if self.newest_checkpoint is None or not run_config.is_file():  # the record of a run: never rewritten
                    save_yaml(self.config, run_config)
                for log in self.logs:  # records past the step we start from belong to a run that did not survive
                    if log.is_file():
                        kept = [line for line in log.read_text().splitlines() if _record_step(line) <= self.step]
                        log.write_text("".join(line + "\n" for line in kept))
                if self.config_changes:
                    record = {"step": self.step, "checkpoint": self.newest_checkpoint.name,
                              "changes": self.config_changes}
                    with (self.output_dir / CONFIG_CHANGES).open("a") as f:
                        f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise explain_write_error(e, self.output_dir, "write in --output-dir") from None
            self.store.set_aside_after(self.step, self.print)
        if self.warmup_warning:
            self.print(self.warmup_warning, file=sys.stderr)
        if self.config.log_with:
            self.accelerator.init_trackers(self.project, config=_flat(self.config.to_dict()))
        logs = ", ".join(sorted({log.name for log in self.logs[:2]}))
        self.print(f"output: {self.output_dir.resolve()} (config.yaml, {logs}, checkpoints/)")
        if "tensorboard" in self.config.log_with:
            tracker = self.accelerator.get_tracker("tensorboard")
            logdir = Path(getattr(tracker, "logging_dir", self.output_dir / self.project)).resolve()
            self.print(f"TensorBoard: tensorboard --logdir {shlex.quote(str(logdir))}")

    def write_record(self, record: dict, path: Path | None = None) -> None:
        """Append a record (with a "step" key) to `path` (default: the step log) and send it to the trackers."""
        if self.is_main:
            with (path or self.metrics_path).open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.config.log_with:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """A config mapping with its model section spread out as "model.key", values as JSON gives them back."""
    flat = {}
    for key, value in config.items():
        if key == "model" and isinstance(value, dict):
            flat.update({f"model.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return json.loads(json.dumps(flat))


def _record_step(line: str) -> float:
    """The step of a metrics record; inf for a line a crash cut short or garbled (it is dropped on resume)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def process_group_timeout(config: TrainConfig) -> timedelta:
    """torch's limit on one collective: a minute past the watchdog's longest allowance, so that the watchdog's
    message comes first (a week when either allowance is off)."""
    if not config.timeout or not config.slow_timeout:  # 0: never end a phase; torch's limit must not either
        return timedelta(days=7)
    return timedelta(seconds=max(config.timeout, config.slow_timeout) + 60)


def configure_cuda() -> None:
    """The GPU settings a training run wants: cuDNN picks its fastest kernels for the fixed input shapes, and
    fp32 matmuls and convs may use TF32 tensor cores (bf16/fp16 autocast regions are unaffected)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


def _flat(values: dict[str, Any]) -> dict[str, Any]:
    """Tracker-friendly config: nested sections become "model.name" keys, lists become strings."""
    flat: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{key}": value for key, value in _flat(v).items()})
        else:
            flat[k] = str(v) if isinstance(v, (list, tuple)) or v is None else v
    return flat
