"""Per-sample seeding: augmentation is a pure function of (seed, epoch, sample index)."""

from __future__ import annotations

import contextlib
import random
from typing import Sequence

import numpy as np
import torch


def seeded(entropy: Sequence[int]) -> None:
    """Seed torch's, numpy's and Python's global RNGs (torchvision, timm's RandAugment and Mixup use all three)."""
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@contextlib.contextmanager
def preserved_rng():
    """Restore the CPU RNG states of torch, numpy and Python on exit."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
