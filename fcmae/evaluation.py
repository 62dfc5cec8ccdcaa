"""Top-1 / top-5 accuracy on a labeled loader, correct under DDP: every image is counted exactly once."""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from .data.datasets import new_unreadable_warnings

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator: Accelerator, progress: bool = False) -> dict[str, float]:
    """Accuracies in percent, the images they count (`images`) and the unreadable ones left out (`unreadable`),
    over the whole (sharded) loader.

    Accelerate pads the last batches so that every process gets one; `gather_for_metrics` drops those
    duplicates, so each image of the dataset is counted once whatever the number of processes. Unreadable files
    (`readable` False, see fcmae.data.Samples) are left out of the accuracies; the main process names each in a
    warning line once per run (the dataset keeps which it `reported`), whichever process or worker met it.
    `progress`: a progress bar (on the main process).
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = unreadable = 0
    found: dict[int, str] = {}  # dataset position -> "PATH: REASON", on this process
    loss_sum = 0.0
    for batch in tqdm(loader, desc="eval", leave=False, dynamic_ncols=True,
                      disable=not (progress and accelerator.is_main_process)):
        with accelerator.autocast():
            logits = model(batch["image"])
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        losses = nn.functional.cross_entropy(logits.float(), batch["label"], reduction="none")
        top, labels, losses, readable = accelerator.gather_for_metrics(
            (top, batch["label"], losses, batch["readable"]))
        found.update(batch.get("unreadable") or {})
        unreadable += int((~readable).sum())
        top, labels, losses = top[readable], labels[readable], losses[readable]  # unreadable files: left out
        hits = top == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += len(labels)
        loss_sum += float(losses.sum())
    model.train(was_training)
    if unreadable:  # the same count on every process: all of them gather, or none
        files = dict(gather_object(sorted(found.items())) if accelerator.num_processes > 1 else found)
        reported = getattr(getattr(loader, "dataset", None), "reported", set())  # fcmae.data.Samples keeps it
        for line in new_unreadable_warnings(files, reported):
            accelerator.print(line, file=sys.stderr)
    if total == 0:
        raise ValueError("the validation set is empty" if not unreadable else
                         f"none of the {unreadable} validation images could be read")
    return {"acc1": 100.0 * correct1 / total, "acc5": 100.0 * correct5 / total, "loss": loss_sum / total,
            "images": total, "unreadable": unreadable}
