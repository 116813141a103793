"""Where a run's batches come from, and how they are split over processes.

Dataloaders come from the arguments of ``fit``/``validate``/``test``/``predict``, else from the
datamodule, else from the module's ``*_dataloader`` methods (neither base class defines them, so
defining one is what opts in). Every ``DataLoader`` gets a distributed sampler under a strategy that
splits data (``use_distributed_sampler=True``) and seeded workers after
``seed_everything(..., workers=True)``: core's ``torchloom.core.data.prepare_dataloader`` does both.
The training loader gets one in a single process too (one replica, keeping the order it has unsplit),
which can begin an epoch part-way through its order: a checkpoint saved mid-epoch on some number of
processes then resumes on another without repeating or skipping a sample (``loops/resume_point.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from torchloom.core.data import prepare_dataloader
from torchloom.core.errors import ConfigurationError
from torchloom.core.utils.rank_zero import rank_zero_warn

__all__ = [
    "KINDS",
    "count_batches",
    "find_dataloader_method",
    "infer_batch_size",
    "prepare_loader",
    "to_loader_list",
]

KINDS = ("train", "val", "test", "predict")


def find_dataloader_method(source: object, kind: str) -> Any:
    """``source.<kind>_dataloader`` when ``source`` defines it, else ``None``."""
    method = getattr(source, f"{kind}_dataloader", None)
    return method if callable(method) else None


def to_loader_list(loaders: Any, kind: str, where: str) -> list[Iterable[Any]]:
    """A single iterable of batches, or a list/tuple of them (evaluation only), as a list."""
    if isinstance(loaders, (list, tuple)) and not _is_batch_iterable(loaders):
        items = list(loaders)
        if kind == "train" and len(items) != 1:
            raise ConfigurationError(
                f"{where} gave {len(items)} training dataloaders; the Trainer trains on one. Valid: a single "
                "DataLoader (combine datasets with torch.utils.data.ConcatDataset)."
            )
    else:
        items = [loaders]
    for item in items:
        if not _is_batch_iterable(item):
            raise ConfigurationError(
                f"{where} gave {item!r} ({type(item).__name__}), which is not a dataloader. Valid: a "
                "torch.utils.data.DataLoader or another iterable of batches"
                + (", or a list of them." if kind != "train" else ".")
            )
    return items


def _is_batch_iterable(obj: object) -> bool:
    if isinstance(obj, DataLoader):
        return True
    if isinstance(obj, (str, bytes, dict, torch.Tensor)) or not isinstance(obj, Iterable):
        return False
    # a list of dataloaders is a list of loaders, not a loader of batches
    return not (isinstance(obj, (list, tuple)) and obj and all(isinstance(x, DataLoader) for x in obj))


def count_batches(loader: Iterable[Any], limit: int | float, name: str) -> int | float:
    """Batches one pass of ``loader`` gives under ``limit`` (``inf`` when it has no length and no int limit)."""
    try:
        length: int | float = len(loader)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        length = math.inf
    if isinstance(limit, int):
        return min(limit, length)
    if math.isinf(length):
        if limit not in (0.0, 1.0):
            raise ConfigurationError(
                f"{name}={limit!r} is a fraction, but the dataloader has no length to take it of. Valid: an int "
                "count of batches, 1.0 or 0.0."
            )
        return math.inf if limit == 1.0 else 0
    count = int(length * limit)
    if limit > 0 and count == 0:
        raise ConfigurationError(
            f"{name}={limit!r} of a dataloader with {length} batches is less than one batch. Valid: a larger "
            "fraction, or an int count of batches."
        )
    return count


def prepare_loader(
    loader: Iterable[Any], sampler_kwargs: dict[str, Any] | None, rank: int, kind: str, *, split: bool = True
) -> Iterable[Any]:
    """A ``DataLoader`` split over processes (unless ``sampler_kwargs`` is ``None``) with seeded workers.

    Training loaders keep shuffling; evaluation loaders are split in order, so every sample is seen
    in a predictable place. Other iterables of batches are used as they are. In one process
    (``sampler_kwargs`` ``None`` while ``split``, i.e. ``use_distributed_sampler=True``) a training
    loader gets a one-replica sampler with the same order, which a resume on more processes continues.
    """
    if not isinstance(loader, DataLoader):
        return loader
    if kind == "train" and split and sampler_kwargs is None:
        try:
            return prepare_dataloader(loader, {"num_replicas": 1, "rank": 0}, rank, keep_draws=True)
        except ConfigurationError as error:  # one process trains fine on the loader as it is
            rank_zero_warn(
                f"The training dataloader keeps its own sampling ({error}); a checkpoint saved mid-epoch then "
                "resumes only on one process."
            )
    return prepare_dataloader(loader, sampler_kwargs, rank, ordered=kind != "train")


def infer_batch_size(batch: Any) -> int:
    """The first dimension of the first tensor in ``batch`` (1 when there is none), for epoch-mean weights."""
    stack: list[Any] = [batch]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            return int(item.shape[0]) if item.dim() > 0 else 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
            stack.extend(item)
    return 1
