"""Training: the Accelerate loop shared by pretrain.py and finetune.py.

    run     `Run`: the Accelerator, batch plan, schedule, output folder and logs around the loop
    loop    `fit`: epochs of accumulated optimizer steps, logs, callbacks, checkpoints (exact resume)
    cli     `run_cli`: one-line errors and clean exits for the scripts
    batch_size   `--batch-size auto`: the largest batch that fits the device
    compilation  torch.compile across processes: a shared cache, one graph, compiled once

Checkpoints (training-state folders) are `fcmae.checkpoints.store`'s.
"""

from ..checkpoints.names import CHECKPOINT_PREFIX
from ..checkpoints.store import find_checkpoint
from .cli import TrainingError, debugging, end_process_group, run_cli, show_causes
from .compilation import use_compile_cache
from .run import Run, configure_cuda, main_process_first, processes_without_gpu, quiet_worker

__all__ = [
    "Run", "TrainingError", "run_cli", "end_process_group", "find_checkpoint", "processes_without_gpu",
    "CHECKPOINT_PREFIX", "configure_cuda", "main_process_first", "quiet_worker", "debugging", "show_causes",
    "use_compile_cache",
]
