"""fabric.setup_dataloaders: which loaders it takes, how it splits, seeds and wraps them (single process).

The sampler and worker-seeding logic itself is core's (tests/core/test_data.py); here: Fabric's wiring of it.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, TensorDataset

from torchloom.core.data import seed_worker
from torchloom.core.errors import ConfigurationError
from torchloom.fabric import Fabric, FabricDataLoader, FabricUsageError

from .helpers import env
from .helpers.datasets import numbers
from .helpers.recorders import RecordingStrategy, SplittingStrategy


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    env.clear(monkeypatch)


class RankOneOfTwo(SplittingStrategy):
    @property
    def global_rank(self) -> int:
        return 1


def test_setup_dataloaders_splits_where_the_strategy_says_so() -> None:
    fabric = Fabric(strategy=SplittingStrategy())
    train, _ = fabric.setup_dataloaders(DataLoader(numbers(8), batch_size=2), DataLoader(numbers(4)))
    assert isinstance(train, FabricDataLoader) and isinstance(train.sampler, DistributedSampler)
    assert [batch.tolist() for batch in train] == [[1, 3], [5, 7]]
    kept = fabric.setup_dataloaders(DataLoader(numbers(8), batch_size=2), use_distributed_sampler=False)
    assert isinstance(kept.sampler, SequentialSampler) and len(kept) == 4
    with pytest.raises(FabricUsageError, match="set up already"):
        fabric.setup_dataloaders(train)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="got list"):
        fabric.setup_dataloaders([1, 2])  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="got no dataloader"):
        fabric.setup_dataloaders()


def test_setup_dataloaders_moves_batches_unless_told_not_to() -> None:
    strategy = RecordingStrategy()
    fabric = Fabric(strategy=strategy)
    single = fabric.setup_dataloaders(DataLoader(TensorDataset(torch.arange(4)), batch_size=2))
    assert isinstance(single.sampler, SequentialSampler)  # one process: nothing to split
    assert single.device == torch.device("cpu") and len(list(single)) == 2
    assert strategy.names().count("batch_to_device") == 2
    assert fabric.setup_dataloaders(DataLoader(TensorDataset(torch.arange(4))), move_to_device=False).device is None


def test_setup_dataloaders_seeds_workers_with_the_global_rank() -> None:
    fabric = Fabric(strategy=RankOneOfTwo())
    unseeded = fabric.setup_dataloaders(DataLoader(numbers(4), num_workers=2))
    assert unseeded.worker_init_fn is None  # no seed_everything(workers=True)
    fabric.seed_everything(5, workers=True)
    seeded = fabric.setup_dataloaders(DataLoader(numbers(4), num_workers=2), use_distributed_sampler=False)
    assert isinstance(seeded.worker_init_fn, functools.partial) and seeded.worker_init_fn.func is seed_worker
    assert seeded.worker_init_fn.keywords == {"rank": 1} and isinstance(seeded.sampler, SequentialSampler)


class NeedsName(DataLoader[Any]):
    def __init__(self, dataset: Any, name: str, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)


def test_a_loader_that_cannot_be_split_fails_setup_with_the_way_out() -> None:
    fabric = Fabric(strategy=SplittingStrategy())
    with pytest.raises(ConfigurationError, match=r"needs \['name'\].*use_distributed_sampler=False"):
        fabric.setup_dataloaders(NeedsName(numbers(4), "x"))
    kept = fabric.setup_dataloaders(NeedsName(numbers(4), "x"), use_distributed_sampler=False)
    assert isinstance(kept.dataloader, NeedsName) and len(kept) == 4
