"""Preparing a user's ``DataLoader`` for a strategy: a distributed sampler, seeded workers, the sampler's epoch.

Both products call ``prepare_dataloader``. It returns the loader itself when nothing needs to
change, else a new one of the same class built from the old one's settings (batch size, collate
function, workers, pinning, ``drop_last``, ...) with:

- a sampler that gives each rank its share, when the strategy splits data (``sampler_kwargs`` is
  not ``None``): a ``SequentialSampler`` becomes a ``ResumableDistributedSampler(shuffle=False)``; a
  ``RandomSampler`` that draws each index once (what ``shuffle=True`` builds) a shuffled one seeded
  from ``TORCHLOOM_GLOBAL_SEED`` (unshuffled with ``ordered=True``, for evaluation); any other
  sampler or batch sampler is wrapped in ``DistributedSamplerWrapper``, which keeps its order. A
  ``DistributedSampler`` already there, or an ``IterableDataset``, is left alone. Each epoch of the
  new samplers follows one global order whatever the number of ranks, and can begin part-way
  through it (``resumable_sampler``): how a resume continues an epoch on another number of ranks;
- a worker seeding function after ``seed_everything(..., workers=True)``, when the loader has
  worker processes and no ``worker_init_fn`` of its own: every worker of every rank gets distinct
  seeds for torch, ``random`` and NumPy, fresh each epoch (torch alone gives worker ``i`` of every
  rank the same ones).
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

from torchloom.core.errors import ConfigurationError
from torchloom.core.samplers import DistributedSamplerWrapper, ResumableDistributedSampler
from torchloom.core.utils.rank_zero import rank_zero_warn
from torchloom.core.utils.seed import SEED_ENV, SEED_WORKERS_ENV

__all__ = [
    "distributed_sampler",
    "prepare_dataloader",
    "rebuild_dataloader",
    "resumable_sampler",
    "seed_worker",
    "set_sampler_epoch",
]

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
_DATALOADER_ARGUMENTS = frozenset(inspect.signature(DataLoader).parameters)


def prepare_dataloader(
    dataloader: DataLoader[Any],
    sampler_kwargs: dict[str, Any] | None,
    rank: int,
    *,
    ordered: bool = False,
    keep_draws: bool = False,
) -> DataLoader[Any]:
    """``dataloader`` split over ranks (when ``sampler_kwargs`` is given) with seeded workers.

    ``sampler_kwargs`` is the strategy's ``distributed_sampler_kwargs``; ``rank`` the global rank;
    ``ordered=True`` splits a shuffling loader without shuffling (evaluation); ``keep_draws=True`` keeps
    a shuffling loader's draws from the random state instead of the seeded order (one process: the
    order it has unsplit).
    """
    changes: dict[str, Any] = {}
    if sampler_kwargs is not None and not isinstance(dataloader.dataset, IterableDataset):
        changes.update(_distributed_sampling(dataloader, sampler_kwargs, ordered, keep_draws))
    if os.environ.get(SEED_WORKERS_ENV) == "1" and dataloader.num_workers > 0 and dataloader.worker_init_fn is None:
        if _accepts(type(dataloader), "worker_init_fn"):
            changes["worker_init_fn"] = functools.partial(seed_worker, rank=rank)
        else:  # seeding is worth a warning, not a failed run
            rank_zero_warn(
                f"{type(dataloader).__name__}.__init__ takes no worker_init_fn, so its workers are not given distinct "
                "seeds per rank: give it a worker_init_fn argument (or **kwargs passed on to DataLoader)."
            )
    return rebuild_dataloader(dataloader, **changes) if changes else dataloader


def _sampling(dataloader: DataLoader[Any]) -> dict[str, Any]:
    """How ``dataloader`` draws batches, as DataLoader arguments: a sampler and batch size, or a batch sampler."""
    batch_sampler = dataloader.batch_sampler
    if batch_sampler is None:  # batch_size=None: one sample at a time
        return {"sampler": dataloader.sampler, "batch_size": None, "drop_last": False}
    if type(batch_sampler) is BatchSampler:  # built from `batch_size` or passed in: its sampler is the real one
        return {
            "sampler": batch_sampler.sampler,
            "batch_size": batch_sampler.batch_size,
            "drop_last": batch_sampler.drop_last,
        }
    return {"batch_sampler": batch_sampler}


def _distributed_sampling(
    dataloader: DataLoader[Any], sampler_kwargs: dict[str, Any], ordered: bool, keep_draws: bool
) -> dict[str, Any]:
    """The sampler or batch sampler of the split loader; empty when the data is split already."""
    sampling = _sampling(dataloader)
    if "sampler" in sampling:
        sampler = distributed_sampler(sampling["sampler"], sampler_kwargs, ordered=ordered, keep_draws=keep_draws)
        return {} if sampler is sampling["sampler"] else {"sampler": sampler}
    batch_sampler = sampling["batch_sampler"]
    if isinstance(batch_sampler, DistributedSampler) or isinstance(
        getattr(batch_sampler, "sampler", None), DistributedSampler
    ):
        return {}
    # a custom batch sampler: each rank takes every num_replicas-th batch of it
    wrapper = DistributedSamplerWrapper(
        cast(Sampler[Any], batch_sampler), shuffle=False, seed=_seed(), **sampler_kwargs
    )
    return {"batch_sampler": wrapper}


def distributed_sampler(
    sampler: Any, sampler_kwargs: dict[str, Any], *, ordered: bool = False, keep_draws: bool = False
) -> Sampler[Any]:
    """The sampler that gives this rank its share of what ``sampler`` draws (``sampler`` itself when it does)."""
    if isinstance(sampler, DistributedSampler):
        return sampler
    if type(sampler) is SequentialSampler or _is_plain_shuffle(sampler):
        dataset = cast(Dataset[Any], sampler.data_source)
        shuffle = type(sampler) is RandomSampler and not ordered
        draw = sampler if shuffle and keep_draws else None
        return ResumableDistributedSampler(dataset, shuffle=shuffle, seed=_seed(), draw=draw, **sampler_kwargs)
    # weighted, with replacement, grouped, ...: its draws are kept, ranks take turns
    return DistributedSamplerWrapper(sampler, shuffle=False, seed=_seed(), **sampler_kwargs)


def resumable_sampler(dataloader: Any) -> tuple[ResumableDistributedSampler, int] | None:
    """The loader's sampler that can begin an epoch part-way, and how many of its positions one batch takes.

    ``None`` when the loader has none (an iterable dataset, a sampler of the user's own, a shuffle
    drawn from a generator of the user's own, which no checkpoint holds and more ranks would not use):
    such a loader's epoch can only be fast-forwarded batch by batch, on the same number of ranks.
    """
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    if isinstance(batch_sampler, ResumableDistributedSampler):  # a wrapped batch sampler: positions are batches
        return batch_sampler, 1
    sampler = getattr(dataloader, "sampler", None)
    if not isinstance(sampler, ResumableDistributedSampler) or getattr(sampler.draw, "generator", None) is not None:
        return None
    if batch_sampler is None:  # batch_size=None: one sample per batch
        return sampler, 1
    if type(batch_sampler) is BatchSampler and batch_sampler.sampler is sampler:
        return sampler, batch_sampler.batch_size
    return None


def _is_plain_shuffle(sampler: Any) -> bool:
    """A ``RandomSampler`` that draws each index once per epoch (what ``shuffle=True`` builds)."""
    return (
        type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == len(sampler.data_source)
    )


def _accepts(cls: type[Any], name: str) -> bool:
    """Whether ``cls(...)`` takes the keyword argument ``name``."""
    parameters = inspect.signature(cls).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _seed() -> int:
    return int(os.environ.get(SEED_ENV, "0"))


def rebuild_dataloader(dataloader: DataLoader[Any], **changes: Any) -> DataLoader[Any]:
    """A new loader of ``dataloader``'s class with its settings, except ``changes``.

    A subclass's own ``__init__`` arguments are taken from attributes of the same name, where it
    keeps them; one that is required and nowhere to be found is a ``ConfigurationError``.
    """
    cls = type(dataloader)
    kwargs = {name: getattr(dataloader, name) for name in _SETTINGS if hasattr(dataloader, name)}
    if "batch_sampler" not in changes:
        sampling = _sampling(dataloader)
        if "sampler" in changes:  # a new sampler keeps the batch size and drop_last
            sampling = {name: value for name, value in sampling.items() if name in ("batch_size", "drop_last")}
        kwargs.update(sampling)
    kwargs.update(changes)
    parameters = inspect.signature(cls).parameters
    named = {n: p for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    attributes = vars(dataloader)  # a subclass's own arguments, where it keeps them under their name
    own = [n for n in named if n not in _DATALOADER_ARGUMENTS and n not in kwargs and not n.startswith("_")]
    kwargs.update({name: attributes[name] for name in own if name in attributes})
    hint = (
        "The DataLoader is rebuilt to give it a distributed sampler or seeded workers. Valid: a DataLoader, or a "
        "subclass whose __init__ takes the DataLoader arguments and keeps its own ones as attributes of the same "
        "name; or split the data yourself (e.g. with a DistributedSampler) and pass use_distributed_sampler=False."
    )
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        refused = [name for name in changes if name not in named]
        if refused:  # dropping them would leave the data unsplit without a word
            raise ConfigurationError(f"Cannot rebuild {cls.__name__}: its __init__ takes no {refused}. {hint}")
        kwargs = {name: value for name, value in kwargs.items() if name in named}  # it sets the others itself
    missing = [name for name, p in named.items() if p.default is p.empty and name not in kwargs]
    if missing:
        raise ConfigurationError(
            f"Cannot rebuild {cls.__name__}: its __init__ needs {missing}, which it does not keep. {hint}"
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigurationError(f"Cannot rebuild {cls.__name__}: {error}. {hint}") from error


def seed_worker(worker_id: int, rank: int) -> None:
    """``worker_init_fn``: seeds torch, ``random`` and NumPy from the loader's seed, the worker id and the rank.

    torch seeds worker ``i`` with ``base + i``, where ``base`` is drawn anew each epoch from the main
    process's generator. After ``seed_everything`` that generator is the same on every rank, so
    without the rank mixed in, worker ``i`` of every rank would draw the same random augmentations.
    """
    base = torch.initial_seed() - worker_id
    sequence = np.random.SeedSequence([base, worker_id, rank])
    torch_seed, python_seed = (int(x) for x in sequence.generate_state(2, dtype=np.uint64))
    torch.manual_seed(torch_seed)
    random.seed(python_seed)
    np.random.seed(sequence.generate_state(4))


def set_sampler_epoch(dataloader: Any, epoch: int) -> None:
    """Tells the loader's samplers the epoch, so a distributed one reshuffles each epoch (alike on every rank)."""
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    candidates = (getattr(dataloader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
    seen: set[int] = set()
    for candidate in candidates:
        set_epoch = getattr(candidate, "set_epoch", None)
        if callable(set_epoch) and id(candidate) not in seen:
            seen.add(id(candidate))
            set_epoch(epoch)
