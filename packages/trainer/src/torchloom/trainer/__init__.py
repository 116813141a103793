"""torchloom-trainer: `Trainer` + `LoomModule`, the training loop written for you.

``from torchloom.trainer import Trainer, LoomModule, LoomDataModule``. The names are loaded on first
use, so ``import torchloom.trainer`` stays cheap; no optional package (tensorboard, deepspeed,
torch-xla) is imported until a feature needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Trainer": "torchloom.trainer.trainer",
    "LoomModule": "torchloom.trainer.module",
    "LoomDataModule": "torchloom.trainer.datamodule",
}

__all__ = ["LoomDataModule", "LoomModule", "Trainer", "__version__"]

if TYPE_CHECKING:
    from torchloom.trainer.datamodule import LoomDataModule
    from torchloom.trainer.module import LoomModule
    from torchloom.trainer.trainer import Trainer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torchloom.trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
