"""Where a run's batches come from, and how they are split over processes.

Dataloaders come from the arguments of ``fit``/``validate``/``test``/``predict``, else from the
datamodule, else from the module's ``*_dataloader`` methods (neither base class defines them, so
defining one is what opts in). Under a strategy that splits data, every ``DataLoader`` gets a
``DistributedSampler`` (``use_distributed_sampler=True``): shuffling is kept from the original
sampler (a ``RandomSampler`` shuffles), a custom sampler is wrapped in core's
``DistributedSamplerWrapper``, and the sampler's seed is the one ``seed_everything`` exported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from torchloom.core.distributed import DistributedSamplerWrapper
from torchloom.core.errors import ConfigurationError
from torchloom.core.utils.seed import SEED_ENV

__all__ = [
    "KINDS",
    "count_batches",
    "find_dataloader_method",
    "infer_batch_size",
    "set_sampler_epoch",
    "to_loader_list",
    "with_distributed_sampler",
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


def with_distributed_sampler(loader: Iterable[Any], sampler_kwargs: dict[str, Any], train: bool) -> Iterable[Any]:
    """``loader`` rebuilt with a ``DistributedSampler`` (or wrapper); unchanged when it needs none."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        raise ConfigurationError(
            f"The dataloader uses the custom batch sampler {type(batch_sampler).__name__}, which the Trainer cannot "
            "split over processes. Valid: shard it yourself and pass Trainer(use_distributed_sampler=False), or "
            "use a plain sampler."
        )
    original: Sampler[Any] = batch_sampler.sampler if batch_sampler is not None else loader.sampler  # type: ignore[assignment]
    if isinstance(original, DistributedSampler):
        return loader
    seed = int(os.environ.get(SEED_ENV, "0"))
    sampler: Sampler[Any]
    if type(original) in (RandomSampler, SequentialSampler):
        shuffle = train and isinstance(original, RandomSampler)
        sampler = DistributedSampler(loader.dataset, shuffle=shuffle, seed=seed, **sampler_kwargs)
    else:
        sampler = DistributedSamplerWrapper(original, shuffle=False, seed=seed, **sampler_kwargs)
    return _rebuild(loader, sampler)


def _rebuild(loader: DataLoader[Any], sampler: Sampler[Any]) -> DataLoader[Any]:
    batch_sampler = loader.batch_sampler
    kwargs: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if loader.batch_size is None and batch_sampler is not None:
        kwargs["batch_sampler"] = BatchSampler(sampler, batch_sampler.batch_size, batch_sampler.drop_last)  # type: ignore[attr-defined]
    else:
        kwargs.update(batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last)
    try:
        return type(loader)(loader.dataset, **kwargs)
    except TypeError as error:
        raise ConfigurationError(
            f"The Trainer could not rebuild your {type(loader).__name__} with a DistributedSampler ({error}). Valid: "
            "a plain DataLoader, or shard the data yourself and pass Trainer(use_distributed_sampler=False)."
        ) from error


def set_sampler_epoch(loader: Iterable[Any], epoch: int) -> None:
    """Tells a distributed sampler the epoch, so each epoch is shuffled differently (and alike on every rank)."""
    for candidate in (
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        set_epoch = getattr(candidate, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


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
