"""Preparing a user's ``DataLoader`` for the strategy: a distributed sampler, seeded workers, a ``FabricDataLoader``.

``prepare_dataloader`` returns the dataloader itself when nothing needs to change, else a new one of
the same class built from the old one's settings (batch size, collate function, workers, pinning,
``drop_last``, ...) with:

- a sampler that gives each rank its share, when the strategy splits data (its
  ``distributed_sampler_kwargs`` is not ``None``): a ``SequentialSampler`` becomes a
  ``DistributedSampler(shuffle=False)``, a ``RandomSampler`` a ``DistributedSampler(shuffle=True)``
  seeded from ``TORCHLOOM_GLOBAL_SEED``; any other sampler or batch sampler is wrapped in core's
  ``DistributedSamplerWrapper`` (its order kept). A ``DistributedSampler`` already there, or an
  ``IterableDataset``, is left alone;
- a worker seeding function, after ``seed_everything(..., workers=True)``, when the loader has worker
  processes and no ``worker_init_fn`` of its own: every worker of every rank gets distinct seeds for
  torch, ``random`` and NumPy, fresh each epoch (torch alone gives the workers of different ranks the same).
"""

from __future__ import annotations

import functools
import inspect
import os
import random
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from torchloom.core.distributed import DistributedSamplerWrapper
from torchloom.core.errors import ConfigurationError
from torchloom.core.strategies.strategy import Strategy
from torchloom.core.utils.seed import SEED_ENV
from torchloom.fabric.checks import FabricUsageError
from torchloom.fabric.wrappers import FabricDataLoader

__all__ = [
    "SEED_WORKERS_ENV",
    "distributed_sampler",
    "prepare_dataloader",
    "rebuild_dataloader",
    "seed_worker",
    "setup_dataloader",
]

SEED_WORKERS_ENV = "TORCHLOOM_SEED_WORKERS"  # "1" after seed_everything(seed, workers=True)

# DataLoader settings carried over to the rebuilt loader (the sampling ones are chosen separately)
_SETTINGS = (
    "dataset",
    "num_workers",
    "collate_fn",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "generator",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory_device",
    "in_order",
)


def setup_dataloader(
    dataloader: Any, strategy: Strategy, sampler_kwargs: dict[str, Any] | None, rank: int, device: torch.device | None
) -> FabricDataLoader:
    """What ``fabric.setup_dataloaders`` returns for one ``DataLoader``: prepared, processed by the strategy, wrapped."""
    if isinstance(dataloader, FabricDataLoader):
        raise FabricUsageError("This dataloader was set up already; pass the plain DataLoader once.")
    if not isinstance(dataloader, DataLoader):
        raise ConfigurationError(
            f"setup_dataloaders() takes torch.utils.data.DataLoader objects, got {type(dataloader).__name__}."
        )
    prepared = prepare_dataloader(dataloader, sampler_kwargs, rank)
    return FabricDataLoader(strategy.process_dataloader(prepared), strategy, device)


def prepare_dataloader(
    dataloader: DataLoader[Any], sampler_kwargs: dict[str, Any] | None, rank: int
) -> DataLoader[Any]:
    """``dataloader`` with a distributed sampler (when ``sampler_kwargs`` is given) and seeded workers."""
    changes: dict[str, Any] = {}
    if sampler_kwargs is not None and not isinstance(dataloader.dataset, IterableDataset):
        changes.update(_distributed_sampling(dataloader, sampler_kwargs))
    if os.environ.get(SEED_WORKERS_ENV) == "1" and dataloader.num_workers > 0 and dataloader.worker_init_fn is None:
        changes["worker_init_fn"] = functools.partial(seed_worker, rank=rank)
    return rebuild_dataloader(dataloader, **changes) if changes else dataloader


def _distributed_sampling(dataloader: DataLoader[Any], sampler_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The sampling arguments of the rebuilt loader; empty when the data is split already."""
    batch_sampler = dataloader.batch_sampler
    if batch_sampler is None or type(batch_sampler) is BatchSampler:  # the loader built it from `sampler`
        sampler = distributed_sampler(dataloader.sampler, sampler_kwargs)
        if sampler is dataloader.sampler:
            return {}
        return {"sampler": sampler, "batch_size": dataloader.batch_size, "drop_last": dataloader.drop_last}
    if isinstance(batch_sampler, DistributedSampler):
        return {}
    # a custom batch sampler: each rank takes every world_size-th batch of it
    wrapper = DistributedSamplerWrapper(
        cast(Sampler[Any], batch_sampler), shuffle=False, seed=_seed(), **sampler_kwargs
    )
    return {"batch_sampler": wrapper}


def distributed_sampler(sampler: Any, sampler_kwargs: dict[str, Any]) -> Sampler[Any]:
    """The sampler that gives this rank its share of what ``sampler`` draws."""
    if isinstance(sampler, DistributedSampler):
        return sampler
    if type(sampler) is SequentialSampler or _is_plain_shuffle(sampler):
        dataset = cast(Dataset[Any], sampler.data_source)
        return DistributedSampler(dataset, shuffle=type(sampler) is RandomSampler, seed=_seed(), **sampler_kwargs)
    return DistributedSamplerWrapper(sampler, shuffle=False, seed=_seed(), **sampler_kwargs)


def _is_plain_shuffle(sampler: Any) -> bool:
    """A ``RandomSampler`` that draws each index once per epoch (what ``shuffle=True`` builds)."""
    return (
        type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == len(sampler.data_source)
    )


def _seed() -> int:
    return int(os.environ.get(SEED_ENV, "0"))


def rebuild_dataloader(dataloader: DataLoader[Any], **changes: Any) -> DataLoader[Any]:
    """A new loader of ``dataloader``'s class with its settings, except ``changes``."""
    cls = type(dataloader)
    kwargs = {name: getattr(dataloader, name) for name in _SETTINGS if hasattr(dataloader, name)}
    if "batch_sampler" not in changes and "sampler" not in changes:
        if dataloader.batch_sampler is None or type(dataloader.batch_sampler) is BatchSampler:
            kwargs.update(sampler=dataloader.sampler, batch_size=dataloader.batch_size, drop_last=dataloader.drop_last)
        else:
            kwargs["batch_sampler"] = dataloader.batch_sampler
    kwargs.update(changes)
    parameters = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        kwargs = {name: value for name, value in kwargs.items() if name in parameters}
    missing = [
        name
        for name, p in list(parameters.items())[1:]
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in kwargs
    ]
    hint = (
        "Fabric rebuilds the DataLoader to give it a distributed sampler or seeded workers. Pass "
        "use_distributed_sampler=False and add a DistributedSampler yourself, or use a plain DataLoader."
    )
    if missing:
        raise ConfigurationError(
            f"Cannot rebuild {cls.__name__}: its __init__ needs {missing}, which are not DataLoader settings. {hint}"
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigurationError(f"Cannot rebuild {cls.__name__}: {error}. {hint}") from error


def seed_worker(worker_id: int, rank: int) -> None:
    """``worker_init_fn``: seeds torch, ``random`` and NumPy from the loader's seed, the worker id and the rank.

    torch seeds worker ``i`` from ``base + i``, where ``base`` is drawn anew each epoch from the main
    process's generator. After ``seed_everything`` that generator is the same on every rank, so
    without the rank mixed in, worker ``i`` of every rank would draw the same random augmentations.
    """
    base = torch.initial_seed() - worker_id
    sequence = np.random.SeedSequence([base, worker_id, rank])
    torch_seed, python_seed = (int(x) for x in sequence.generate_state(2, dtype=np.uint64))
    torch.manual_seed(torch_seed)
    random.seed(python_seed)
    np.random.seed(sequence.generate_state(4))
