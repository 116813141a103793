"""Seeding every random number generator a training job uses."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["seed_everything"]

SEED_ENV = "TORCHLOOM_GLOBAL_SEED"
SEED_WORKERS_ENV = "TORCHLOOM_SEED_WORKERS"  # "1": dataloader workers get distinct seeds (see torchloom.core.data)


def seed_everything(seed: int, workers: bool = False) -> int:
    """Seeds Python, NumPy and torch (all devices) and exports the seed for worker processes.

    With ``workers=True`` dataloader workers derive their own distinct seeds from it
    (``TORCHLOOM_SEED_WORKERS=1`` tells the dataloader setup to install the worker init function).
    """
    max_seed = 2**32 - 1
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= max_seed:
        from torchloom.core.errors import ConfigurationError

        raise ConfigurationError(f"seed={seed!r} is not valid: use an int between 0 and {max_seed}.")
    os.environ[SEED_ENV] = str(seed)
    os.environ[SEED_WORKERS_ENV] = "1" if workers else "0"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every device's generator too
    return seed
