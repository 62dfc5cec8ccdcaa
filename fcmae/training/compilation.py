"""torch.compile for a run of many processes: one graph, a cache shared by processes and runs, compiled once.

Without care, every process of a node compiles the same graph at the same time (8 cold compiles sharing one host's
CPUs took more than 165 s for tiny), and the next run compiles it again. Here:
- `--compile-cache DIR` makes DIR inductor's cache (TORCHINDUCTOR_CACHE_DIR): kernels and whole compiled graphs
  (FX graph and AOTAutograd caches) are written there and found again by the other processes and by later runs
  (on a shared file system, by every node). Without it inductor uses its own, per user, under the system's temp
  folder, which outlives the run on that node.
- The main process compiles first, in one warm-up step on a synthetic batch, while the others wait; they then
  find its graph in the cache. Their wait is bounded by the process group's timeout, which is --slow-timeout plus a
  minute (fcmae.training.run.process_group_timeout), not torch's default of 10 minutes.
- With several processes Dynamo's DDP optimizer is off: it would cut the graph at every DDP bucket (about 5 pieces
  for tiny, 15 for base), each compiled, cached and, with CUDA graphs, replayed on its own. One graph costs the
  overlap of the gradient all-reduce with the backward (the all-reduce runs after it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

__all__ = ["use_compile_cache", "compile_once"]


def use_compile_cache(folder: str) -> Path | None:
    """Make `folder` inductor's cache for this process (before anything compiles); None when folder is empty."""
    if not folder:
        return None
    cache = Path(folder).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # read by inductor whenever it looks for its cache
    return cache


def compile_once(accelerator: Accelerator, warm_up: Callable[[], None]) -> None:
    """Run warm_up() (one compiled forward and backward) on the main process, then on the others, which then load
    the main process's graph from the cache instead of compiling it again."""
    if accelerator.num_processes > 1:
        torch._dynamo.config.optimize_ddp = False  # one graph (see the module docstring)
    if accelerator.is_main_process:
        warm_up()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        warm_up()
