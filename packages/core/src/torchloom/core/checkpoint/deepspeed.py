"""DeepSpeed checkpoints: DeepSpeed's own directory format, with torchloom's extra state beside it.

Layout of ``path/``: what ``engine.save_checkpoint(path, tag=TAG)`` writes (``latest``, ``TAG/`` with
one model-states and one optimizer-states file per rank, DeepSpeed's ``zero_to_fp32.py``), plus
``EXTRA_FILE``, written by rank 0 after every rank finished its part: everything of the saved state that
is not the engine's (the step, the loop position, schedulers, ...), which top-level entries the engine
holds, and their shape. A directory without ``EXTRA_FILE`` is an incomplete save.

DeepSpeed unpickles its partition files with ``weights_only=False``. ``check_partitions`` first reads
each one's pickle through torch's restricted unpickler, allowing only the plain-data classes DeepSpeed
itself pickles there (``DEEPSPEED_GLOBALS``): a partition file that would import anything else is
refused before DeepSpeed opens it.

``load_consolidated`` reads such a directory in one process, without a process group, into the dict a
single-file save would have written: module entries as full float32 state dicts (DeepSpeed's
``zero_to_fp32`` gathers the ZeRO partitions), the extra state as it was. Optimizer state stays
partitioned per rank in DeepSpeed's format and is left out.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch

from torchloom.core.checkpoint.checks import VERSION_KEY, read_format_file, running_version, safe_load
from torchloom.core.checkpoint.io import TorchCheckpointIO
from torchloom.core.errors import CheckpointError
from torchloom.core.utils.imports import require

__all__ = [
    "DEEPSPEED_GLOBALS",
    "EXTRA_FILE",
    "TAG",
    "EngineState",
    "check_partitions",
    "is_deepspeed_checkpoint",
    "load_consolidated",
    "read_extra",
    "write_extra",
]

EXTRA_FILE = "torchloom_deepspeed.pt"
TAG = "checkpoint"
_FORMAT = "torchloom-deepspeed-checkpoint"
_VERSION = 1
MODULE, OPTIMIZER = "module", "optimizer"
# What DeepSpeed 0.19 pickles into its partition files besides tensors and builtins (found with
# torch.serialization.get_unsafe_globals_in_checkpoint over stages 1-3, fp32, bf16 and offload): an enum,
# a dataclass and the loss-scale holders, rebuilt from their fields without running code of the file's choosing.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class EngineState(dict[str, Any]):
    """A checkpoint entry that DeepSpeed's engine saves and loads itself (the module's weights, or a marker
    for its partitioned optimizer state). A DeepSpeed save routes it to the engine, not to ``EXTRA_FILE``."""

    def __init__(self, kind: str, content: dict[str, Any] | None = None) -> None:
        super().__init__(content or {})
        self.kind = kind


def is_deepspeed_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a complete checkpoint directory written by ``DeepSpeedStrategy``."""
    folder = Path(path)
    return (folder / EXTRA_FILE).is_file() and (folder / "latest").is_file()


def write_extra(path: str | os.PathLike[str], entries: dict[str, Any], state: dict[str, Any]) -> None:
    """Writes ``EXTRA_FILE`` atomically: ``entries`` (key -> "module", "optimizer" or a list of them) and ``state``."""
    extra = {
        "format": _FORMAT,
        "version": _VERSION,
        VERSION_KEY: running_version(),
        "tag": TAG,
        "entries": entries,
        "state": state,
    }
    TorchCheckpointIO().save_checkpoint(extra, Path(path) / EXTRA_FILE)


def read_extra(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``EXTRA_FILE`` of a DeepSpeed checkpoint directory: ``entries``, ``state``, ``tag``."""
    if not is_deepspeed_checkpoint(path):
        raise CheckpointError(
            f"{os.fspath(path)!r} is not a complete torchloom DeepSpeed checkpoint: expected a directory holding "
            f"DeepSpeed's 'latest' and torchloom's {EXTRA_FILE!r} (written last; a save cut short lacks it). Load "
            "the previous checkpoint, or save again."
        )
    extra_file = Path(path) / EXTRA_FILE
    extra = read_format_file(extra_file, _FORMAT, _VERSION, "the DeepSpeed checkpoint's extra state")
    return extra


def skeleton(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every top-level entry of the saved state: plain values as saved, engine entries as their kinds."""
    extra = read_extra(path)
    return {**extra["state"], **extra["entries"]}


def check_partitions(path: str | os.PathLike[str], tag: str) -> None:
    """``CheckpointError`` unless every partition file under ``path/tag`` unpickles with ``weights_only=True``
    and DeepSpeed's own ``DEEPSPEED_GLOBALS`` (tensor data is memory-mapped, not read)."""
    folder = Path(path) / tag
    files = sorted(folder.glob("*.pt"))
    if not files:
        raise CheckpointError(
            f"The DeepSpeed checkpoint {os.fspath(path)!r} has no partition files in {str(folder)!r}: it is "
            "incomplete. Load the previous checkpoint, or save again."
        )
    with torch.serialization.safe_globals([_import(name) for name in DEEPSPEED_GLOBALS]):
        for file in files:
            safe_load(file, mmap=True)


def _import(qualified_name: str) -> Any:
    module, _, name = qualified_name.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_consolidated(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint as one dict (module entries as full float32 weights; optimizer entries left out)."""
    extra = read_extra(path)
    check_partitions(path, extra["tag"])  # zero_to_fp32 unpickles them with weights_only=False
    zero_to_fp32 = require("deepspeed", "Reading a DeepSpeed checkpoint").utils.zero_to_fp32
    weights: dict[str, Any] | None = None
    checkpoint = dict(extra["state"])
    for key, kind in extra["entries"].items():
        if kind != MODULE:
            continue
        if weights is None:
            weights = dict(zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(os.fspath(path), tag=extra["tag"]))
            weights = {name: tensor.contiguous() for name, tensor in weights.items()}
        checkpoint[key] = weights
    return checkpoint
