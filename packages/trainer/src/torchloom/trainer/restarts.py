"""Resuming a restarted worker: ``fit`` in a worker that torch's elastic agent started again picks up its last checkpoint.

``torchloom run --max-restarts N`` (or torchrun's) restarts every worker after one fails, and exports
``TORCHELASTIC_RESTART_COUNT`` (1, 2, ... on the restarts). There, ``fit(model)`` without ``ckpt_path``
resumes from ``"last"``: the newest complete ``last*.ckpt`` of the Trainer's ModelCheckpoint callbacks
(the same search as ``ckpt_path="last"``), so a restart continues the run instead of training from
scratch. A ``ckpt_path`` the user passed wins; without a complete checkpoint the run starts over.
Rank 0 prints one line either way, and every rank resumes from the file rank 0 found.

A restart is a new process: a logger without a fixed version picks the next ``version_N`` folder, and a
ModelCheckpoint without ``dirpath`` saves into it, so the failed attempt's checkpoints are elsewhere. When
restarts are allowed, rank 0 therefore records its checkpoint folders in the elastic agent's store, which
outlives the attempts, and a restarted rank 0 searches those folders too.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
from typing import TYPE_CHECKING, Any

from torchloom.core.utils.rank_zero import rank_zero_info
from torchloom.trainer.checkpoint import _find_last, _is_complete

if TYPE_CHECKING:
    from torch._C._distributed_c10d import Store

    from torchloom.trainer.trainer import Trainer

__all__ = ["RESTART_COUNT_ENV", "restart_ckpt_path", "restart_count"]

RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"
_FOLDERS_KEY = "torchloom/restarts/checkpoint_folders"  # a key of the agent's store, which no attempt prefixes
_STORE_TIMEOUT = datetime.timedelta(seconds=60)


def restart_count() -> int:
    """How many times the elastic agent restarted this worker's group (0: the first attempt, or no agent)."""
    value = os.environ.get(RESTART_COUNT_ENV, "0")
    return int(value) if value.isdigit() else 0


def restart_ckpt_path(trainer: Trainer, fn: str, ckpt_path: Any) -> Any:
    """``ckpt_path``, or in a restarted ``fit`` without one, the last complete checkpoint (if there is one)."""
    if fn != "fit" or ckpt_path is not None:
        return ckpt_path
    restarts = restart_count()
    store = _agent_store() if trainer.is_global_zero and _restarts_allowed() else None
    earlier = _remember_folders(store, trainer) if store is not None else []
    if restarts == 0:
        return None
    found = trainer._adapter.broadcast(_newest_last(trainer, earlier) if trainer.is_global_zero else None)
    if found is None:
        rank_zero_info(f"torchloom: restart {restarts}: no complete checkpoint to resume from; fit starts over.")
    else:
        rank_zero_info(f"torchloom: restart {restarts}: resuming fit from the last checkpoint {found}")
    return found


def _restarts_allowed() -> bool:
    value = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    return value.isdigit() and int(value) > 0


def _agent_store() -> Store | None:
    """The elastic agent's store (it lives as long as the agent), when the workers meet in it."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch._C._distributed_c10d import TCPStore  # torch.distributed re-exports it, but not for type checkers

    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    return TCPStore(address, port, is_master=False, timeout=_STORE_TIMEOUT)


def _remember_folders(store: Store, trainer: Trainer) -> list[str]:
    """Adds this attempt's checkpoint folders to those the store holds; returns the earlier attempts' folders."""
    earlier: list[str] = json.loads(store.get(_FOLDERS_KEY)) if store.check([_FOLDERS_KEY]) else []
    mine = [callback.dirpath for callback in trainer.checkpoint_callbacks if callback.dirpath]
    store.set(_FOLDERS_KEY, json.dumps(sorted({*earlier, *mine})))
    return earlier


def _newest_last(trainer: Trainer, folders: list[str]) -> str | None:
    """The newest complete ``last*.ckpt`` of this run's callbacks and of ``folders``."""
    candidates = [path for folder in folders for path in glob.glob(os.path.join(glob.escape(folder), "last*.ckpt"))]
    candidates = [path for path in candidates if _is_complete(path)]
    own = _find_last(trainer)
    if own is not None:
        candidates.append(own)
    return max(candidates, key=os.path.getmtime) if candidates else None
