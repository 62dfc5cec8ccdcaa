"""`--batch-size auto`: the largest per-process batch whose training step fits the device.

The step is tried at descending candidate sizes (Accelerate's `should_reduce_batch_size` tells an out-of-memory
error from any other) until one fits. With an effective batch set, the candidates are the divisors of its
per-process share, so that accumulation reaches it exactly; otherwise powers of two. The processes then take the
smallest size any of them found, so that every rank runs the same batch.

"Fits" means the trial step's peak stays under 90% of the device's memory: the rest is for what a trial does not
hold (the optimizer's state, DDP's gradient buckets, the allocator's fragmentation over a long run). The trial runs
eager: a compiled step needs no more memory than the eager one (it frees activations earlier), and compiling at
every candidate size would take minutes each.

On a CPU an allocation that does not fit is usually not an error but the kernel's OOM killer, and the speed per
image stops growing past a few dozen images, so the search starts at CPU_CAP.
"""

from __future__ import annotations

import gc
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils.memory import should_reduce_batch_size

from ..errors import ConfigError

__all__ = ["find_batch_size", "candidates", "CPU_CAP", "GPU_CAP"]

CPU_CAP = 32  # the largest batch auto tries on a CPU
GPU_CAP = 2048  # ... and on a GPU, when no effective batch bounds it
HEADROOM = 0.9  # the share of the device's memory a trial step may peak at


def candidates(cap: int, per_process: int | None) -> list[int]:
    """Sizes to try, largest first: divisors of `per_process` (an effective batch's share) up to `cap`, or powers
    of two up to `cap`."""
    if per_process:
        return [b for b in range(min(cap, per_process), 0, -1) if per_process % b == 0]
    return [2**i for i in range(cap.bit_length() - 1, -1, -1)]


def find_batch_size(trial: Callable[[int], None], accelerator: Accelerator, effective_batch_size: int,
                    images: int, cap: int | None = None) -> tuple[int, str]:
    """(batch size, a sentence saying how it was chosen) for `--batch-size auto`.

    trial(batch_size): one forward and backward at that batch on the training device (gradients left behind are
    cleared here). effective_batch_size: 0 or the recipe's. images: training images, which one batch per process
    may not exceed (drop_last). cap: the largest size to try (default CPU_CAP or GPU_CAP by device).
    """
    processes = accelerator.num_processes
    per_process = None
    if effective_batch_size:
        if effective_batch_size % processes:
            raise ConfigError(f"effective_batch_size {effective_batch_size} is not a multiple of {processes} "
                              "processes: --batch-size auto needs one share per process")
        per_process = effective_batch_size // processes
    cuda = accelerator.device.type == "cuda"
    cap = min(cap or (GPU_CAP if cuda else CPU_CAP), max(images // processes, 1))
    sizes = candidates(cap, per_process)
    too_large: list[int] = []
    found = 0
    for size in sizes:
        if _fits(trial, size, accelerator.device):
            found = size
            break
        too_large.append(size)
    if processes > 1:  # every rank the same batch: the smallest any found
        found = int(accelerator.gather(torch.tensor([found], device=accelerator.device)).min())
    if not found:
        raise ConfigError(f"--batch-size auto: not even a batch of {sizes[-1]} fits {accelerator.device}; use a "
                          "smaller --input-size or model")
    limit = "its memory" if cuda else f"{cap} (the CPU cap)"
    tried = f"; {', '.join(map(str, too_large))} did not fit" if too_large else ""
    note = f"batch size auto: {found} per process, the largest that fits {accelerator.device} up to {limit}{tried}"
    return found, note


def _fits(trial: Callable[[int], None], size: int, device: torch.device) -> bool:
    """Run the trial step at `size`; False when it runs out of memory (or peaks above HEADROOM on a GPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        trial(size)
        if cuda:
            torch.cuda.synchronize(device)
            _, total = torch.cuda.mem_get_info(device)
            return torch.cuda.max_memory_allocated(device) <= HEADROOM * total
        return True
    except Exception as e:  # noqa: BLE001 - anything but running out of memory is re-raised
        if not should_reduce_batch_size(e):
            raise
        return False
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
