"""finetune.py --linear-probe on small data: MAE's effective batch where the data is large, a smaller one (and lr)
where an epoch would otherwise be a single step; on real digits it reaches what logistic regression reaches."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState

import fcmae
from fcmae.config import LINEAR_PROBE_RECIPE, ConfigError
from fcmae.data import find_labeled_images, load_rgb, write_digits
from fcmae.training import run_cli

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import finetune  # noqa: E402


def probe_config(*argv: str) -> finetune.FinetuneConfig:
    return finetune.parse_config(finetune.FinetuneConfig, ["--data-path", "x", "--linear-probe", *argv])


def test_mae_batch_where_the_data_is_large_a_capped_one_where_it_is_small():
    probe = probe_config("--batch-size", "128")
    assert LINEAR_PROBE_RECIPE["min_steps_per_epoch"] == probe.min_steps_per_epoch == 20
    # ImageNet-1k on 8 processes: 1251 batches of 1024 an epoch, 16 of them per step of 16384: 79 steps. MAE's.
    assert probe.effective_accum_steps(8, 1_281_167 // 1024) == (16, "accum_steps 16 to reach effective batch 16384 "
                                                                     "= 128 x 8 process(es) x 16")
    # 1438 digits in batches of 32 (44 a epoch): MAE's batch would be all 44 in one step; capped at 2 (22 steps).
    small = probe_config("--batch-size", "32")
    accum, note = small.effective_accum_steps(1, 1438 // 32)
    assert accum == 2 and small.base_lr(32 * accum) == pytest.approx(0.1 * 64 / 256)
    assert note == ("accum_steps 2: effective batch 64 = 32 x 1 process(es) x 2 instead of 16384, so that an epoch "
                    "of 44 batch(es) makes 22 optimizer steps, not 1 (min_steps_per_epoch 20); the lr follows the "
                    "batch")
    assert "\n" not in note
    # Fewer batches than the minimum: one batch per step, and the note says how to get more.
    accum, note = small.effective_accum_steps(2, 12)
    assert accum == 1 and "makes 12 optimizer steps, not 1" in note and "lower --batch-size for more" in note
    # --min-steps-per-epoch 0 is MAE's protocol everywhere; a fine-tune (no switch) never caps.
    assert probe_config("--min-steps-per-epoch", "0").effective_accum_steps(1, 44)[0] == 44
    plain = finetune.parse_config(finetune.FinetuneConfig, ["--data-path", "x", "--effective-batch-size", "1024"])
    assert plain.min_steps_per_epoch == 0 and plain.effective_accum_steps(1, 44)[0] == 32
    with pytest.raises(ConfigError, match="min_steps_per_epoch must be >= 0"):
        probe_config("--min-steps-per-epoch", "-1")
