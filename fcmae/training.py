"""The Accelerate training loop shared by pretrain.py and finetune.py.

`Run` owns everything around a training step: the Accelerator (processes, devices, mixed precision), the
optimizer's schedule, checkpoints and exact resume, metrics, the progress bar, trackers and clean failure.
A script supplies the model, optimizer, data loader and a `step_fn(model, batch) -> (loss, images)`.

Exact resume. The position in training is the optimizer step. From it the loop derives the epoch and the
batches to skip inside it (Accelerate's seedable sampler gives each epoch the same order, and augmentation is
seeded per sample, see fcmae.data), and the learning rate (a pure function of the step). The global RNG is
re-seeded from (seed, step, micro-batch, process) before every micro-batch, so masks and drop-path draws do not
depend on what ran before. Model, optimizer and grad-scaler states come from Accelerate's checkpoint.

Checkpoints live in OUTPUT_DIR/checkpoints/step_XXXXXXXX. Each is written to a hidden temporary folder first
and renamed when complete, so a crash mid-save never leaves a half-written checkpoint behind or removes the
previous one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import safetensors.torch
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from timm.scheduler import CosineLRScheduler
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import ConfigError, TrainConfig, load_yaml, save_yaml
from .data import seeded
from .checkpoints import write_safetensors

__all__ = [
    "Run", "TrainingError", "run_cli", "end_process_group", "find_checkpoint", "processes_without_gpu",
    "CHECKPOINT_PREFIX", "configure_cuda",
]

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"

StepFn = Callable[[nn.Module, dict], tuple[Tensor, int]]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says what was kept."""


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a script's main; user errors end with a one-line message and exit status 2 (no traceback).

    User errors are bad values, files and folders (ValueError, OSError: missing, unwritable, a file where a folder
    should be) and a run that cannot go on (TrainingError). Set FCMAE_DEBUG=1 to see the traceback anyway.
    """
    try:
        main(argv)
    except (ValueError, OSError, TrainingError) as e:
        if os.environ.get("FCMAE_DEBUG"):
            raise
        message = str(e).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: its last line is the error itself
            message = message.splitlines()[-1]
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last saved checkpoint is intact", file=sys.stderr)
        return 130
    finally:
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


def processes_without_gpu() -> bool:
    """Several processes but no GPU (e.g. `accelerate launch --multi_gpu` on a laptop): Accelerate must be told
    to use the CPU, then it runs DDP over gloo."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _checkpoint_step(path: Path) -> int:
    """The step in a checkpoint folder's name (step_00000120 -> 120); -1 for a foreign name."""
    digits = path.name[len(CHECKPOINT_PREFIX):]
    return int(digits) if digits.isdigit() else -1


def _record_step(line: str) -> float:
    """The step of a metrics record; inf for a line a crash cut short or garbled (it is dropped on resume)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def find_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under OUTPUT_DIR/checkpoints, or None."""
    folder = Path(output_dir) / "checkpoints"
    done = sorted(p for p in folder.glob(CHECKPOINT_PREFIX + "*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


class Run:
    """One training run: build it from a config, `prepare` the objects, then `fit`.

    Args:
        config: the resolved config; saved to OUTPUT_DIR/config.yaml and into every checkpoint.
        project: tracker project name.
        step_log: file in OUTPUT_DIR that gets a JSON record every log_every steps.

    Attributes a script may fill before `fit`: `extra_state` (name -> module whose state dict is saved as
    NAME.safetensors in every checkpoint and restored on resume, e.g. an EMA model) and `info` (JSON values kept
    in every checkpoint's trainer_state.json and restored on resume, e.g. the best accuracy so far).
    """

    def __init__(self, config: TrainConfig, project: str, step_log: str = "metrics.jsonl"):
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
        self._check_output_dir()
        set_seed(config.seed)
        self.step = 0
        self.skipped_files = 0
        self.extra_state: dict[str, nn.Module] = {}
        self.info: dict[str, Any] = {}
        self.project = project
        self.metrics_path = self.output_dir / step_log
        self.logs = [self.metrics_path, self.output_dir / "metrics.jsonl"]  # JSONL files cut back on resume

    def _start(self) -> None:
        """Write the run's config and open the trackers: only once everything has been checked and loaded."""
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(self.config, self.output_dir / "config.yaml")
            for log in self.logs:  # records past the step we start from belong to a run that did not survive
                if log.is_file():
                    kept = [line for line in log.read_text().splitlines() if _record_step(line) <= self.step]
                    log.write_text("".join(line + "\n" for line in kept))
            self._set_aside_later_checkpoints()
        if self.config.log_with:
            self.accelerator.init_trackers(self.project, config=_flat(dataclasses.asdict(self.config)))

    def _set_aside_later_checkpoints(self) -> None:
        """Resuming from an older checkpoint abandons the later ones. Rename them (abandoned_step_XXXXXXXX) rather
        than delete them: --resume auto and pruning then only see this run's line, and nothing saved is lost."""
        folder = self.output_dir / "checkpoints"
        for path in sorted(folder.glob(CHECKPOINT_PREFIX + "*")):
            if _checkpoint_step(path) > self.step:
                target = folder / f"abandoned_{path.name}"
                n = 1
                while target.exists():
                    target, n = folder / f"abandoned_{path.name}.{n}", n + 1
                os.replace(path, target)
                self.print(f"set aside {path.name} (later than the step resumed from) as {target.name}")

    def print(self, *args: Any) -> None:
        """Print on the main process only, above the progress bar if there is one."""
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args))

    # Setup ------------------------------------------------------------------------------------------------------

    def _check_output_dir(self) -> None:
        """A folder we can write to, and never another run's checkpoints to overwrite (and later prune)."""
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ConfigError(f"output_dir {self.output_dir} is a file, not a folder")
        outputs = ["checkpoints", "model.safetensors", "metrics.jsonl"]
        existing = [name for name in outputs if (self.output_dir / name).exists()]
        if existing and not self.config.resume:
            raise ConfigError(
                f"{self.output_dir} already holds a run ({', '.join(existing)}); pass --resume auto to continue it, "
                "or choose another --output-dir"
            )
        resume = self.config.resume
        if existing and resume and resume != "auto" and (
                Path(resume).resolve().parent != (self.output_dir / "checkpoints").resolve()):
            raise ConfigError(
                f"--resume {resume} is not one of {self.output_dir}'s checkpoints, and {self.output_dir} already "
                f"holds a run ({', '.join(existing)}); continue it in its own output dir, or choose an empty "
                "--output-dir"
            )
        for tracker in self.config.log_with:
            if importlib.util.find_spec(tracker) is None:
                raise ConfigError(f"--log-with {tracker} needs the {tracker} package: pip install {tracker}")

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader):
        """Wrap model, optimizer and loader for the processes and devices; sets the schedule's length."""
        self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        config = self.config
        # Accelerate steps the optimizer at the end of every epoch, after a partial accumulation too.
        self.steps_per_epoch = math.ceil(len(self.loader) / config.accum_steps)
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the dataset is too small for one batch: {len(loader.dataset)} images, batch size "
                f"{config.batch_size} x {self.accelerator.num_processes} processes; lower --batch-size"
            )
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        warmup = config.warmup_steps if config.warmup_steps >= 0 else round(config.warmup_epochs * self.steps_per_epoch)
        self.warmup_steps = min(warmup, self.total_steps)
        cosine_log = logging.getLogger("timm.scheduler.cosine_lr")
        level = cosine_log.level
        cosine_log.setLevel(logging.ERROR)  # its "no effect" warning for runs that are all warmup (short demos)
        try:
            self.scheduler = CosineLRScheduler(
                self.optimizer, t_initial=max(self.total_steps - self.warmup_steps, 1), lr_min=config.min_lr,
                warmup_t=self.warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
            )  # fmt: skip
        finally:
            cosine_log.setLevel(level)
        return self.model, self.optimizer, self.loader

    def plan_batches(self, num_images: int) -> None:
        """Before `base_lr` and `prepare`: turn config.effective_batch_size (if set) into accum_steps for this many
        processes and training images (drop_last batches), and say what was chosen."""
        processes = self.accelerator.num_processes
        accum, note = self.config.effective_accum_steps(processes, num_images // (self.config.batch_size * processes))
        self.config.accum_steps = accum
        self.accelerator.gradient_accumulation_steps = accum
        if note:
            self.print(note)

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

    # Checkpoints ------------------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Load the checkpoint named by config.resume ("auto": the newest in output_dir, if any)."""
        resume = self.config.resume
        if not resume:
            return
        path = find_checkpoint(self.output_dir) if resume == "auto" else Path(resume)
        if path is None:
            self.print(f"--resume auto: no checkpoint in {self.output_dir}/checkpoints yet, starting from scratch")
            return
        if not path.exists():
            raise ConfigError(f"checkpoint not found: {path}")
        if not (path / STATE_FILE).is_file():
            raise ConfigError(f"not a complete training checkpoint: {path} (no {STATE_FILE})")
        saved = load_yaml(path / "config.yaml")
        if saved.get("model") != self.config.model:
            raise ConfigError(f"checkpoint {path} is for model {saved.get('model')}, not {self.config.model}")
        try:
            self.accelerator.load_state(str(path))
        except Exception as e:  # torch, safetensors and Accelerate each raise their own types for a bad file
            detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:3])
            raise ConfigError(f"checkpoint {path} does not match this run or is damaged: {detail}") from None
        for name, module in self.extra_state.items():
            if not (path / f"{name}.safetensors").is_file():
                raise ConfigError(f"checkpoint {path} has no {name} weights: it was saved without them "
                                  f"(e.g. --no-model-{name}); resume with the settings it was saved with")
            module.load_state_dict(safetensors.torch.load_file(path / f"{name}.safetensors", device="cpu"))
        try:
            state = json.loads((path / STATE_FILE).read_text())
            self.step, self.skipped_files, self.info = int(state["step"]), state["skipped_files"], state["info"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"checkpoint {path} has a damaged {STATE_FILE} ({e!r})") from None
        self.print(f"resumed from {path} at step {self.step}")

    def save_checkpoint(self, on_save: Callable[[Path], None] | None = None) -> Path:
        """Write the full training state to checkpoints/step_XXXXXXXX atomically and keep the newest keep_last."""
        folder = self.output_dir / "checkpoints"
        final = folder / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        tmp = folder / f".tmp_{final.name}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        try:
            self.accelerator.save_state(str(tmp), safe_serialization=True)
        except (RuntimeError, OSError) as e:  # torch.save reports a full disk as a RuntimeError
            previous = find_checkpoint(self.output_dir)
            reason = str(e).strip().splitlines()[0]
            raise TrainingError(f"could not write checkpoint {final} ({reason}; disk full?); "
                                f"the previous checkpoint {previous} is intact") from None
        self.accelerator.wait_for_everyone()
        if self.is_main:
            save_yaml(self.config, tmp / "config.yaml")
            for name, module in self.extra_state.items():
                write_safetensors(module.state_dict(), tmp / f"{name}.safetensors", {"format": "pt"})
            state = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                     "skipped_files": self.skipped_files, "info": self.info}
            (tmp / STATE_FILE).write_text(json.dumps(state))  # written last: marks the folder complete
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted(folder.glob(CHECKPOINT_PREFIX + "*"))[: -self.config.keep_last]:
                shutil.rmtree(old)
            if on_save is not None:
                on_save(final)
        self.accelerator.wait_for_everyone()
        return final

    # The loop ---------------------------------------------------------------------------------------------------

    def fit(
        self,
        step_fn: StepFn,
        every_step: Callable[[int], None] | None = None,
        on_epoch_end: Callable[[int], None] | None = None,
        on_save: Callable[[Path], None] | None = None,
    ) -> None:
        """Train from self.step (after resuming) to total_steps.

        step_fn(model, batch) -> (loss, images in the batch). Callbacks: every_step(step) after each optimizer
        step (e.g. visualization); on_epoch_end(epoch) when an epoch's last step is done, and at the run's last
        step if that ends an epoch early (--max-steps), before the checkpoint (e.g. evaluation); on_save(checkpoint
        folder), on the main process after each checkpoint.
        """
        self.resume()
        self._start()
        self.scheduler.step_update(self.step)
        epoch, skip = divmod(self.step, self.steps_per_epoch)
        window = _Window(self.accelerator.device)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.is_main, dynamic_ncols=True,
                   desc="train")
        with bar:  # closed on errors too, so that a message starts on a fresh line
            self.model.train()
            while self.step < self.total_steps:
                self.loader.set_epoch(epoch)
                batches = self.loader
                if skip:  # resumed mid-epoch: the epoch's order, less the batches already trained on
                    batches = self.accelerator.skip_first_batches(self.loader, skip * self.config.accum_steps)
                for _ in self._optimizer_steps(batches, step_fn, window):
                    bar.update(1)
                    save_due = self.step % self.config.save_every == 0 or self.step == self.total_steps
                    if self.step % self.config.log_every == 0 or self.step == self.total_steps:
                        self._log(window, bar)
                    elif save_due:
                        self.check_finite(window)
                    if every_step is not None:
                        every_step(self.step)
                    if on_epoch_end is not None and (self.step % self.steps_per_epoch == 0
                                                     or self.step == self.total_steps):  # a --max-steps run's last
                        on_epoch_end(epoch)
                    if save_due:
                        self.save_checkpoint(on_save)
                    if self.step >= self.total_steps:
                        break
                epoch, skip = epoch + 1, 0
        self.accelerator.end_training()

    def _optimizer_steps(self, batches, step_fn: StepFn, window: "_Window"):
        """Run the batches of one epoch; yields after each optimizer step (accumulation done by Accelerate).

        Nothing here waits on the device: the loss and a non-finite flag are summed on it, and read every
        log_every steps and before every checkpoint (`_log`, `check_finite`).
        """
        micro = 0
        for batch in batches:
            self._seed(micro)
            with self.accelerator.accumulate(self.model):
                loss, images = step_fn(self.model, batch)
                self.accelerator.backward(loss)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            window.add(loss.detach(), images, batch.get("skipped"), self.step + 1)
            micro += 1
            if self.accelerator.sync_gradients:
                self.step, micro = self.step + 1, 0
                self.scheduler.step_update(self.step)
                yield

    def _seed(self, micro: int) -> None:
        """Seed the global RNGs from (seed, step, micro-batch, process): draws do not depend on history."""
        seeded([self.config.seed, self.step, micro, self.accelerator.process_index])

    def check_finite(self, window: "_Window") -> None:
        """Stop, on every process at once, if a loss since the last check was non-finite: before it reaches a
        checkpoint or a metrics record. The weights it reached in memory are dropped with the process."""
        bad = window.first_bad(self.accelerator)
        if bad is None:
            return
        step, value = bad
        last = find_checkpoint(self.output_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
        raise TrainingError(
            f"the loss became non-finite ({value}) at step {step}; stopped without saving, {kept}. "
            "Try a lower --blr, more warmup, or bf16 instead of fp16"
        )

    def _log(self, window: "_Window", bar: tqdm) -> dict:
        self.check_finite(window)
        loss, images, skipped, seconds = window.reduce(self.accelerator)
        self.skipped_files += skipped
        record = {
            "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "loss": loss,
            "lr": max(group["lr"] for group in self.optimizer.param_groups),  # the undecayed group's
            "images_per_s": round(images / max(seconds, 1e-9), 2), "skipped_files": self.skipped_files,
        }  # fmt: skip
        self.write_record(record)
        if self.is_main:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.1f}")
        return record

    def write_record(self, record: dict, path: Path | None = None) -> None:
        """Append a record (with a "step" key) to `path` (default: the step log) and send it to the trackers."""
        if self.is_main:
            with (path or self.metrics_path).open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.config.log_with:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


class _Window:
    """Loss, image and skipped-file sums since the last log record, and the first non-finite loss since the last
    check, all kept on the device: adding to them never waits on it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bad = torch.tensor([math.inf, 0.0], device=device, dtype=torch.float64)  # first bad step, its loss
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss*n, n batches, images, skipped
        self.start = time.perf_counter()

    def add(self, loss: Tensor, images: int, skipped: Tensor | None, step: int) -> None:
        loss = loss.double()
        self.sums[0] += loss
        self.sums[1] += 1
        self.sums[2] += images
        if skipped is not None:
            self.sums[3] += skipped.sum().double()
        first = ~torch.isfinite(loss) & torch.isinf(self.bad[0])  # python scalars, not tensors: no host copy
        self.bad[0] = torch.where(first, float(step), self.bad[0])
        self.bad[1] = torch.where(first, loss, self.bad[1])

    def first_bad(self, accelerator: Accelerator) -> tuple[int, float] | None:
        """(step, loss) of the earliest non-finite loss on any process, or None."""
        bad = accelerator.gather(self.bad[None]).view(-1, 2).tolist()
        step, value = min(bad, key=lambda b: b[0])
        return None if math.isinf(step) else (int(step), value)

    def reduce(self, accelerator: Accelerator) -> tuple[float, int, int, float]:
        """(mean loss, images, skipped files, seconds), summed over processes; then starts a new window."""
        sums = accelerator.reduce(self.sums.clone(), reduction="sum").tolist()
        seconds = time.perf_counter() - self.start
        self.reset()
        return sums[0] / max(sums[1], 1), int(sums[2]), int(sums[3]), seconds


def configure_cuda() -> None:
    """The GPU settings a training run wants: cuDNN picks its fastest kernels for the fixed input shapes, and
    fp32 matmuls and convs may use TF32 tensor cores (bf16/fp16 autocast regions are unaffected)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


def _flat(values: dict[str, Any]) -> dict[str, Any]:
    """Tracker-friendly config: lists become strings."""
    return {k: (str(v) if isinstance(v, (list, tuple)) or v is None else v) for k, v in values.items()}

