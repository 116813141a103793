"""Checkpoint bytes on disk: the CheckpointIO contract and the atomic torch-file implementation."""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from torchloom.core.checkpoint.checks import check_checkpoint, refuse_directory, safe_load

__all__ = ["CheckpointIO", "TorchCheckpointIO"]


class CheckpointIO(ABC):
    """Writes and reads one checkpoint. Strategies decide who calls it and with what."""

    @abstractmethod
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> None: ...

    @abstractmethod
    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any = "cpu", weights_only: bool = True
    ) -> dict[str, Any]: ...

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        target = Path(path)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()

    def teardown(self) -> None:
        pass


class TorchCheckpointIO(CheckpointIO):
    """``torch.save`` to a temp file in the target folder, fsync, then rename over the target.

    A crash mid-save leaves the previous checkpoint intact. Loads use ``weights_only=True`` unless
    the caller opts out, so a checkpoint cannot run code when it is opened. A file that cannot be loaded
    (truncated, corrupt, not a dict, a pickle that would run code, written by a newer torchloom) or a
    directory that is not a complete checkpoint raises ``CheckpointError`` (see ``checks.py``).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any = "cpu", weights_only: bool = True
    ) -> dict[str, Any]:
        target = Path(path)
        if target.is_dir():
            refuse_directory(target)
        if not target.is_file():
            raise FileNotFoundError(f"No checkpoint file at {str(target)!r}.")
        return check_checkpoint(safe_load(target, map_location=map_location, weights_only=weights_only), target)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some file systems do not support opening folders.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
