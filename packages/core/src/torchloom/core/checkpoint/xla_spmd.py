"""Checkpoint directories of the XLA SPMD strategy, through ``torch.distributed.checkpoint`` with torch-xla's planners."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from torchloom.core.accelerators.xla import import_torch_xla
from torchloom.core.checkpoint.distributed import remove_path, swap_into_place

__all__ = ["as_whole_file", "is_spmd_checkpoint", "save_spmd"]

_MARKER = "torchloom_xla_spmd"  # an empty file: the directory is complete and written by save_spmd


def is_spmd_checkpoint(path: str | os.PathLike[str]) -> bool:
    folder = Path(path)
    return (folder / _MARKER).is_file() and (folder / ".metadata").is_file()


def save_spmd(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Writes ``state`` (sharded XLA tensors, plain values) to the directory ``path``.

    ``SPMDSavePlanner`` writes each shard of a sharded tensor once, straight from the devices. The whole is
    staged as ``.<name>.partial`` beside ``path`` and moved over it once complete, so a failed save leaves
    the previous checkpoint where it was.
    """
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save

    planners = import_torch_xla("torch_xla.experimental.distributed_checkpoint", "XLA SPMD checkpoints")
    target = Path(path)
    staging = target.parent / f".{target.name}.partial"
    remove_path(staging)
    staging.mkdir(parents=True)
    try:
        save(state, storage_writer=FileSystemWriter(staging), planner=planners.SPMDSavePlanner(), no_dist=True)
        (staging / _MARKER).touch()
    except BaseException:
        remove_path(staging)
        raise
    swap_into_place(staging, target)


@contextlib.contextmanager
def as_whole_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """The checkpoint directory at ``path`` as one temporary torch file of whole CPU tensors, while inside.

    Read whole rather than shard by shard: torch-xla 2.9's ``SPMDLoadPlanner`` fails on replicated tensors
    (a parameter too small to shard), and one SPMD process holds all of its host's shards anyway. Loading
    the whole tensors into the set-up module shards them again.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as folder:
        whole = Path(folder) / Path(path).name
        dcp_to_torch_save(path, whole)
        checkpoint = torch.load(whole, map_location="cpu", weights_only=True)
        torch.save(_int_optimizer_keys(checkpoint), whole)
        yield whole


def _int_optimizer_keys(value: Any) -> Any:
    """DCP stores dict keys as strings: an optimizer state's parameter indices come back as ``"0"``, ``"1"``..."""
    if not isinstance(value, dict):
        return value
    value = {key: _int_optimizer_keys(item) for key, item in value.items()}
    state = value.get("state")
    if "param_groups" in value and isinstance(state, dict) and all(str(k).isdigit() for k in state):
        value["state"] = {int(key): item for key, item in state.items()}
    return value
