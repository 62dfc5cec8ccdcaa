"""`Run`: one training run's setup around the loop (fcmae.training.loop) and its checkpoint store.

It owns the Accelerator (processes, devices, mixed precision), the batch plan and the learning-rate schedule,
the output folder and its logs, and hands saving and resuming to `fcmae.checkpoints.store.CheckpointStore`.
A script supplies the model, optimizer, data loader and a `step_fn(model, batch) -> (loss, images)`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list, set_seed
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm.auto import tqdm

from ..checkpoints import names
from ..checkpoints.output import check_output_folder, explain_write_error
from ..checkpoints.store import CheckpointStore, Position, check_position
from ..config import ConfigError, TrainConfig, load_yaml, save_yaml
from . import loop

__all__ = ["Run", "processes_without_gpu", "configure_cuda", "main_process_first", "quiet_worker"]

T = TypeVar("T")


def processes_without_gpu() -> bool:
    """Several processes but no GPU (e.g. `accelerate launch --multi_gpu` on a laptop): Accelerate must be told
    to use the CPU, then it runs DDP over gloo."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def main_process_first(accelerator: Accelerator, fn: Callable[[], T]) -> T:
    """fn() on the main process, then on the others (e.g. "digits:FOLDER" is written once). If it fails on the
    main process with a user error, every process raises that error: none is left waiting at a barrier whose
    peer has gone (which ends in a gloo traceback)."""
    failure: list[Any] = [None]
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
        if not accelerator.is_main_process:
            result = fn()
    return result


def quiet_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: workers start afresh each epoch, so a warning about a file (e.g. unreadable)
    would repeat every epoch; after the first epoch it is not shown again (the skipped_files count goes on)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and getattr(info.dataset, "epoch", 0) > 0:
        warnings.simplefilter("ignore", UserWarning)


class Run:
    """One training run: build it from a config, `prepare` the objects, then `fit`.

    Args:
        config: the resolved config; saved to OUTPUT_DIR/config.yaml and into every checkpoint.
        project: tracker project name.
        step_log: file in OUTPUT_DIR that gets a JSON record every log_every steps.

    Attributes a script may fill before `fit`: `extra_state` (name -> module whose state dict is saved as
    NAME.safetensors in every checkpoint and restored on resume, e.g. an EMA model) and `info` (JSON values kept
    in every checkpoint's trainer_state.json and restored on resume, e.g. the best accuracy so far).

    `step` counts optimizer steps; `at` (= step, unless a resume changed the batch plan) is where the schedule
    and the data order stand.
    """

    def __init__(self, config: TrainConfig, project: str, step_log: str = names.METRICS):
        self.config = config
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
        )
        if self.accelerator.device.type == "cuda":
            configure_cuda()
        self.is_main = self.accelerator.is_main_process
        self.store = CheckpointStore(self.output_dir, self.accelerator, config.keep_last)
        self._check_output_dir()
        set_seed(config.seed)
        self.step = self.offset = self.skipped_files = 0
        self.extra_state: dict[str, nn.Module] = {}
        self.info: dict[str, Any] = {}
        self.project = project
        self.metrics_path = self.output_dir / step_log
        self.logs = [self.metrics_path, self.output_dir / names.METRICS]  # JSONL files cut back on resume
        self.show_progress = config.progress and self.is_main and sys.stdout.isatty()

    fit = loop.fit

    @property
    def at(self) -> int:
        return self.step + self.offset

    def main_process_first(self, fn: Callable[[], T]) -> T:
        return main_process_first(self.accelerator, fn)

    def print(self, *args: Any, file=None) -> None:
        """Print on the main process only, above the progress bar if there is one."""
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args), file=file)

    def progress_bar(self, **kwargs) -> tqdm:
        """A tqdm bar on the main process, unless --no-progress or stdout is not a terminal (a log file)."""
        return tqdm(disable=not self.show_progress, dynamic_ncols=True, **kwargs)

    # Setup ------------------------------------------------------------------------------------------------------

    def _check_output_dir(self) -> None:
        """A folder we can write to, and never another run's checkpoints to overwrite (and later prune)."""
        check_output_folder(self.output_dir, create=False)
        outputs = [names.CHECKPOINTS, *names.RUN_MODELS, names.METRICS]
        existing = [name for name in outputs if (self.output_dir / name).exists()]
        resume = self.config.resume
        if existing and not resume:
            raise ConfigError(
                f"{self.output_dir} already holds a run ({', '.join(existing)}); pass --resume auto to continue it, "
                "or choose another --output-dir"
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

    def plan_batches(self, num_images: int) -> None:
        """Before `base_lr` and `prepare`: turn config.effective_batch_size (if set) into accum_steps for this many
        processes and training images (drop_last batches), and say what was chosen."""
        processes = self.accelerator.num_processes
        accum, note = self.config.effective_accum_steps(processes, num_images // (self.config.batch_size * processes))
        self.config.accum_steps = accum
        self.accelerator.gradient_accumulation_steps = accum
        if note:
            self.print(note)

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
            peak = self.base_lr() * self.total_steps / warmup
            self.warmup_warning = (f"warning: all {self.total_steps} steps are warmup (warmup {warmup} steps): the "
                                   f"learning rate only climbs, to {peak:.2e} at the end, and never decays; lower "
                                   "--warmup-epochs / --warmup-steps or train longer")
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
        """lr, or blr * effective batch / 256."""
        return self.config.lr or self.config.blr * self.effective_batch_size / 256

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
        path = self.store.open(self.config.resume)
        if path is None:
            self.print(f"--resume auto: no checkpoint in {self.store.folder} yet, starting from scratch")
            return
        saved = load_yaml(path / names.RUN_CONFIG)
        saved_model = saved.get("model")  # a name, or the model: section of a pretraining config
        saved_name = saved_model.get("name") if isinstance(saved_model, dict) else saved_model
        if saved_name != self.config.model_name:
            raise ConfigError(f"checkpoint {path} is for model {saved_name}, not {self.config.model_name}")
        state = json.loads((path / names.TRAINER_STATE).read_text()) if (path / names.TRAINER_STATE).is_file() else {}
        position, note = check_position(path, state, saved, self.position, self.config.allow_resume_change)
        state = self.store.load(path, self.extra_state)
        self.step, self.offset = position.step, position.offset
        self.skipped_files, self.info = state["skipped_files"], state["info"]
        if note:
            self.print(note)
        self.print(f"resumed from {path} at step {self.step}")

    def save_checkpoint(self, on_save: Callable[[Path], None] | None = None) -> Path:
        """Write the full training state to checkpoints/step_XXXXXXXX atomically and keep the newest keep_last."""
        final = self.store.save(self.position, lambda path: save_yaml(self.config, path), self.extra_state,
                                self.info, self.skipped_files)
        if on_save is not None and self.is_main:
            on_save(final)
        self.accelerator.wait_for_everyone()
        return final

    def start(self) -> None:
        """Write the run's config and open the trackers: only once everything has been checked and loaded."""
        if self.is_main:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                save_yaml(self.config, self.output_dir / names.RUN_CONFIG)
                for log in self.logs:  # records past the step we start from belong to a run that did not survive
                    if log.is_file():
                        kept = [line for line in log.read_text().splitlines() if _record_step(line) <= self.step]
                        log.write_text("".join(line + "\n" for line in kept))
            except OSError as e:
                raise explain_write_error(e, self.output_dir, "write in --output-dir") from None
            self.store.set_aside_after(self.step, self.print)
        if self.warmup_warning:
            self.print(self.warmup_warning, file=sys.stderr)
        if self.config.log_with:
            self.accelerator.init_trackers(self.project, config=_flat(self.config.to_dict()))

    def write_record(self, record: dict, path: Path | None = None) -> None:
        """Append a record (with a "step" key) to `path` (default: the step log) and send it to the trackers."""
        if self.is_main:
            with (path or self.metrics_path).open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.config.log_with:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def _record_step(line: str) -> float:
    """The step of a metrics record; inf for a line a crash cut short or garbled (it is dropped on resume)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


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
