"""The training loop, in the spirit of MAE's engine_pretrain.py: epochs of optimizer steps, each a few
accumulated micro-batches; a log record every log_every steps; callbacks; a checkpoint every save_every steps.

Exact resume. The position in training is the optimizer step. From it the loop derives the epoch and the
batches to skip inside it (Accelerate's seedable sampler gives each epoch the same order, and augmentation is
seeded per sample, see fcmae.data), and the learning rate (a pure function of the step). The global RNG is
re-seeded from (seed, step, micro-batch, process) before every micro-batch, so masks and drop-path draws do not
depend on what ran before. Nothing here waits on the device: losses are summed on it and read every log_every
steps and before every checkpoint.
"""

from __future__ import annotations

import math
import sys
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn

from ..checkpoints import names
from ..data import seeded
from ..data.datasets import new_unreadable_warnings
from .cli import TrainingError
from .preemption import Preempted

if TYPE_CHECKING:
    from .run import Run

__all__ = ["fit", "StepFn"]

StepFn = Callable[[nn.Module, dict], tuple[Tensor, int]]


def fit(run: "Run", step_fn: StepFn, every_step: Callable[[int], None] | None = None,
        on_epoch_end: Callable[[int], None] | None = None, on_save: Callable | None = None,
        feed: Callable[[Iterable[dict]], Iterable[dict]] | None = None) -> None:
    """Train from run.step (after resuming) to run.total_steps.

    step_fn(model, batch) -> (loss, images in the batch). Callbacks: every_step(step) after each optimizer step
    (e.g. visualization, EMA); on_epoch_end(epoch) when an epoch's last step is done, and at the run's last step
    if that ends an epoch early (--max-steps), before the checkpoint (e.g. evaluation); on_save(checkpoint
    folder), on the main process after each checkpoint. feed(batches) -> batches, e.g. `fcmae.data.DeviceFeed`,
    which moves them to the device a step ahead.

    A stop request (SIGTERM, SIGUSR1, the launcher gone; see fcmae.training.preemption) ends the run after the
    step in progress, with a checkpoint of it: `Preempted` is raised once it is saved.
    """
    run.open_output_dir()
    run.resume()
    run.start()
    run.scheduler.step_update(run.at)
    epoch, skip = divmod(run.at, run.steps_per_epoch)
    window = Window(run.accelerator.device, run.step)
    # The bar is closed on errors too; signals and the watchdog are on only while training runs.
    with run.supervised() as watchdog, run.progress_bar(total=run.total_steps, initial=run.at, desc="train") as bar:
        run.model.train()
        while run.at < run.total_steps:
            run.loader.set_epoch(epoch)
            batches = run.loader
            if skip:  # resumed mid-epoch: the epoch's order, less the batches already trained on
                batches = run.accelerator.skip_first_batches(run.loader, skip * run.config.accum_steps)
            if feed is not None:
                batches = feed(batches)
            for _ in optimizer_steps(run, batches, step_fn, window):
                bar.update(1)
                watchdog.progress(run.step, slow=True)  # callbacks and saves may take long
                last = run.at >= run.total_steps
                stop = None if last else run.stop_requested()
                save_due = run.step % run.config.save_every == 0 or last or stop
                if run.step % run.config.log_every == 0 or save_due:  # a checkpoint keeps the log's totals
                    log(run, window, bar)
                if stop:
                    run.print(f"{stop}: saving a checkpoint at step {run.step}, then stopping", file=sys.stderr)
                if every_step is not None:  # before any save, a stop's too (e.g. EMA): resume stays exact
                    every_step(run.step)
                if on_epoch_end is not None and (run.at % run.steps_per_epoch == 0 or last):
                    on_epoch_end(epoch)
                if save_due:
                    saved = run.save_checkpoint(on_save)
                if stop:
                    run.accelerator.end_training()  # trackers flushed and closed
                    raise Preempted(run.stop_message(stop, saved))
                if last:
                    break
                watchdog.progress(run.step, slow=False)
            epoch, skip = epoch + 1, 0
    run.accelerator.end_training()


def optimizer_steps(run: "Run", batches, step_fn: StepFn, window: "Window") -> Iterator[None]:
    """Run the batches of one epoch; yields after each optimizer step (accumulation done by Accelerate)."""
    micro = 0
    for batch in batches:
        seeded([run.config.seed, run.step, micro, run.accelerator.process_index])  # draws independent of history
        with run.accelerator.accumulate(run.model):
            loss, images = step_fn(run.model, batch)
            run.accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        window.add(loss.detach(), images, batch.get("unreadable"), run.step + 1)
        micro += 1
        if run.accelerator.sync_gradients:
            run.step, micro = run.step + 1, 0
            run.scheduler.step_update(run.at)
            yield


def check_finite(run: "Run", window: "Window") -> None:
    """Stop, on every process at once, if a loss since the last check was non-finite: before it reaches a
    checkpoint or a metrics record. The weights it reached in memory are dropped with the process.

    The loss of step M is computed from the weights saved as step M - 1, so a non-finite loss at step M makes the
    checkpoint of step M - 1 suspect (blown-up weights give a finite loss a step before they give nan). It is set
    aside as diverged_step_...; the checkpoints before it held weights whose loss was finite.
    """
    bad = window.first_bad(run.accelerator)
    if bad is None:
        return
    step, value = bad
    suspect = run.store.folder / names.checkpoint_name(step - 1)
    note = ""
    if run.is_main and (suspect / names.TRAINER_STATE).is_file():
        aside = run.store.set_aside(suspect, names.DIVERGED)
        note = f"set aside {suspect.name}, whose weights gave it, as {aside.name}; "
    run.accelerator.wait_for_everyone()
    good = run.store.find()
    kept = (f"the newest checkpoint whose weights gave a finite loss is {good} ({run.resume_command()} resumes it)"
            if good else "no checkpoint whose weights gave a finite loss had been saved")
    raise TrainingError(f"the loss became non-finite ({value}) at step {step}; stopped without saving. {note}{kept}. "
                        "Try a lower --blr, more warmup, or bf16 instead of fp16")


def log(run: "Run", window: "Window", bar) -> dict:
    """A metrics record of the window since the last one: to the step log, the trackers and the progress bar."""
    check_finite(run, window)
    loss, images, seconds, unreadable = window.reduce(run.accelerator, known=run.unreadable)
    for line in new_unreadable_warnings(unreadable, run.unreadable):  # counted in run.unreadable; warned once
        run.print(line, file=sys.stderr)
    record = {
        "step": run.step, "epoch": round(run.at / run.steps_per_epoch, 4), "loss": loss,
        "lr": max(group["lr"] for group in run.optimizer.param_groups),  # the undecayed group's
        "images_per_s": round(images / max(seconds, 1e-9), 2), "skipped_files": len(run.unreadable),
    }  # fmt: skip
    run.write_record(record)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.1f}")
    steps, window.logged_step = run.step - window.logged_step, run.step
    if run.progress_lines:
        run.print(progress_line(run, record, seconds / max(steps, 1)))
    return record


def progress_line(run: "Run", record: dict, step_seconds: float) -> str:
    """What the bar shows, as one plain line for a log file: step/total, loss, lr, images/s and the time left at the
    pace of the steps since the last line."""
    left = timedelta(seconds=round((run.total_steps - run.at) * step_seconds))
    skipped = f", {record['skipped_files']} unreadable files skipped" if record["skipped_files"] else ""
    return (f"step {run.at}/{run.total_steps} (epoch {record['epoch']:g}): loss {record['loss']:.4f}, lr "
            f"{record['lr']:.2e}, {record['images_per_s']:.1f} img/s, ETA {left}{skipped}")


class Window:
    """Loss and image sums since the last log record and the first non-finite loss since the last check, kept on
    the device (adding to them never waits on it), and the unreadable files met, by dataset position, kept on the
    host with its 'PATH: REASON' (a bad file counts once however often it is drawn, by whichever process or
    worker)."""

    def __init__(self, device: torch.device, step: int = 0):
        self.device = device
        self.logged_step = step  # the step of the last log record (the window's steps follow it)
        self.bad = torch.tensor([math.inf, 0.0], device=device, dtype=torch.float64)  # first bad step, its loss
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss*n, n batches, images, new bad files
        self.unreadable: dict[int, str] = {}
        self.start = time.perf_counter()

    def add(self, loss: Tensor, images: int, unreadable: dict[int, str] | None, step: int) -> None:
        loss = loss.double()
        self.sums[0] += loss
        self.sums[1] += 1
        self.sums[2] += images
        if unreadable:  # a plain dict on the host (fcmae.data.CollateUnreadable)
            self.unreadable.update(unreadable)
        first = ~torch.isfinite(loss) & torch.isinf(self.bad[0])  # python scalars, not tensors: no host copy
        self.bad[0] = torch.where(first, float(step), self.bad[0])
        self.bad[1] = torch.where(first, loss, self.bad[1])

    def first_bad(self, accelerator: Accelerator) -> tuple[int, float] | None:
        """(step, loss) of the earliest non-finite loss on any process, or None."""
        bad = accelerator.gather(self.bad[None]).view(-1, 2).tolist()
        step, value = min(bad, key=lambda b: b[0])
        return None if math.isinf(step) else (int(step), value)

    def reduce(self, accelerator: Accelerator, known: set[int]) -> tuple[float, int, float, dict[int, str]]:
        """(mean loss, images, seconds, unreadable files not in `known`), over all processes; then starts a new
        window. The files are gathered only when some process met a new one."""
        new = [(position, text) for position, text in sorted(self.unreadable.items()) if position not in known]
        self.sums[3] = len(new)
        sums = accelerator.reduce(self.sums.clone(), reduction="sum").tolist()
        if sums[3] and accelerator.num_processes > 1:
            new = gather_object(new)  # every process's list, joined
        seconds = time.perf_counter() - self.start
        self.reset()
        return sums[0] / max(sums[1], 1), int(sums[2]), seconds, dict(new)
