"""Resuming a restarted worker: ``fit`` in a worker that torch's elastic agent started again picks up its last checkpoint.

``torchloom run --max-restarts N`` (or torchrun's) restarts every worker after one fails, and exports
``TORCHELASTIC_RESTART_COUNT`` (1, 2, ... on the restarts). There, ``fit(model)`` without ``ckpt_path``
resumes from ``"last"``: the newest complete ``last*.ckpt`` of the Trainer's ModelCheckpoint callbacks
(the same search as ``ckpt_path="last"``), so a restart continues the run instead of training from
scratch. A ``ckpt_path`` the user passed wins; without a complete checkpoint the run starts over.
Rank 0 prints one line either way, and every rank resumes from the file rank 0 found.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from torchloom.core.utils.rank_zero import rank_zero_info
from torchloom.trainer.checkpoint import _find_last

if TYPE_CHECKING:
    from torchloom.trainer.trainer import Trainer

__all__ = ["RESTART_COUNT_ENV", "restart_count", "restart_ckpt_path"]

RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"


def restart_count() -> int:
    """How many times the elastic agent restarted this worker's group (0: the first attempt, or no agent)."""
    value = os.environ.get(RESTART_COUNT_ENV, "0")
    return int(value) if value.isdigit() else 0


def restart_ckpt_path(trainer: Trainer, fn: str, ckpt_path: Any) -> Any:
    """``ckpt_path``, or in a restarted ``fit`` without one, the last complete checkpoint (if there is one)."""
    restarts = restart_count()
    if fn != "fit" or ckpt_path is not None or restarts == 0:
        return ckpt_path
    found = trainer._adapter.broadcast(_find_last(trainer) if trainer.is_global_zero else None)
    if found is None:
        rank_zero_info(f"torchloom: restart {restarts}: no complete checkpoint to resume from; fit starts over.")
    else:
        rank_zero_info(f"torchloom: restart {restarts}: resuming fit from the last checkpoint {found}")
    return found
