"""The name of every file and folder a run writes, in one place (docs/pretraining.md, "Files a run writes").

The model a run hands out and Accelerate's weights inside a training-state folder used to share the name
`model.safetensors`. Our artifacts now have their own names; Accelerate's keeps its (Accelerate picks it), and
`LEGACY_MODEL` is still read from run folders written before the rename.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "PRETRAINED_MODEL", "CLASSIFIER", "LEGACY_MODEL", "ACCELERATE_WEIGHTS", "ACCELERATE_WEIGHTS_PICKLE",
    "CHECKPOINTS", "CHECKPOINT_PREFIX", "TRAINER_STATE", "RUN_CONFIG", "METRICS", "TRAIN_LOG", "VIS", "RUN_MODELS",
    "LOCK", "SHARED_PROBE", "ABANDONED", "DIVERGED", "EXPORT_WEIGHTS", "EXPORT_CONFIG", "EXPORT_PREPROCESSOR",
    "MODEL_CARD", "EXPORT_FILES",
    "checkpoint_name", "checkpoint_step", "run_model_file",
]

PRETRAINED_MODEL = "fcmae_model.safetensors"  # pretrain.py: the FCMAE model + its config, rewritten at every save
CLASSIFIER = "classifier.safetensors"  # finetune.py: the best classifier so far, timm layout + eval settings
LEGACY_MODEL = "model.safetensors"  # either of the two above, in runs written before they were renamed
ACCELERATE_WEIGHTS = "model.safetensors"  # Accelerate's save_state: bare model weights in a checkpoint folder
ACCELERATE_WEIGHTS_PICKLE = "pytorch_model.bin"  # the same, from save_state(safe_serialization=False)
CHECKPOINTS = "checkpoints"  # OUTPUT_DIR/checkpoints/step_XXXXXXXX: training-state folders
CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"  # step, epoch, position facts, script info; written last: marks it complete
RUN_CONFIG = "config.yaml"  # the resolved training config (run folder, and a copy in every checkpoint)
METRICS = "metrics.jsonl"  # a record every log_every steps (pretrain) or every epoch (finetune)
TRAIN_LOG = "train_log.jsonl"  # finetune.py: the per-step records
VIS = "vis"  # pretrain.py: reconstruction grids, vis/step_XXXXXXXX.png
LOCK = ".fcmae.lock"  # held by a live run's main process (fcmae.checkpoints.folder_lock): pid, host, start time
SHARED_PROBE = ".fcmae-shared-"  # + the run's id: written and removed at start, to check all nodes see the folder
ABANDONED, DIVERGED = "abandoned", "diverged"  # checkpoints set aside as WHY_step_XXXXXXXX (resumed past; nan)
RUN_MODELS = (PRETRAINED_MODEL, CLASSIFIER, LEGACY_MODEL)  # what a run folder may hand out, in that order
# An export folder (fcmae-convert --to timm FOLDER / transformers): the names timm's local-dir: and transformers'
# from_pretrained read. --overwrite replaces no folder holding other files.
EXPORT_WEIGHTS = "model.safetensors"  # the weights
EXPORT_CONFIG = "config.json"  # timm's Hub config, or the transformers model config
EXPORT_PREPROCESSOR = "preprocessor_config.json"  # transformers: the image processor
MODEL_CARD = "README.md"  # the model card
EXPORT_FILES = frozenset({EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_PREPROCESSOR, MODEL_CARD})


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint folder's name (step_00000120 -> 120); -1 for a foreign name."""
    digits = path.name[len(CHECKPOINT_PREFIX):] if path.name.startswith(CHECKPOINT_PREFIX) else ""
    return int(digits) if digits.isdigit() else -1


def run_model_file(run_dir: Path) -> Path | None:
    """The model file a run folder hands out (either name, or the old one), or None."""
    return next((run_dir / name for name in RUN_MODELS if (run_dir / name).is_file()), None)
