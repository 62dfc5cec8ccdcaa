"""Top-1 / top-5 accuracy on a labeled loader, correct under DDP: every image is counted exactly once."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator: Accelerator, progress: bool = False) -> dict[str, float]:
    """Accuracies in percent and the image count, over the whole (sharded) loader.

    Accelerate pads the last batches so that every process gets one; `gather_for_metrics` drops those
    duplicates, so each image of the dataset is counted once whatever the number of processes. Unreadable files
    (`readable` False, see fcmae.data.ImageFiles) are left out of every count. `progress`: a progress bar (on the
    main process).
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = total = 0
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
        top, labels, losses = top[readable], labels[readable], losses[readable]  # unreadable files: left out
        hits = top == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += len(labels)
        loss_sum += float(losses.sum())
    model.train(was_training)
    if total == 0:
        raise ValueError("the validation set is empty")
    return {"acc1": 100.0 * correct1 / total, "acc5": 100.0 * correct5 / total, "loss": loss_sum / total,
            "images": total}
