"""Training: the Accelerate loop shared by pretrain.py and finetune.py.

    run     `Run`: the Accelerator, batch plan, schedule, output folder and logs around the loop
    loop    `fit(run, step_fn)`: epochs of accumulated optimizer steps, logs, callbacks, checkpoints (exact resume)
    batch_size   `--batch-size auto`: the largest batch that fits the device
    compilation  torch.compile across processes: a shared cache, one graph, compiled once

Checkpoints (training-state folders) are `fcmae.checkpoints.store`'s; how the scripts end is `fcmae.cli`'s.
"""

from ..checkpoints.names import CHECKPOINT_PREFIX
from ..checkpoints.store import find_checkpoint
from ..errors import TrainingError
from .compilation import use_compile_cache
from .loop import fit
from .run import Run, configure_cuda, main_process_first, processes_without_gpu, quiet_worker

__all__ = [
    "Run", "fit", "TrainingError", "find_checkpoint", "processes_without_gpu", "CHECKPOINT_PREFIX", "configure_cuda",
    "main_process_first", "quiet_worker", "use_compile_cache",
]
