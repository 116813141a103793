"""Dataloader preparation: distributed samplers, rebuilt loaders, seeded workers (single process; 2 ranks elsewhere)."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from torchloom.core.distributed import DistributedSamplerWrapper
from torchloom.core.errors import ConfigurationError
from torchloom.fabric import Fabric, FabricDataLoader, FabricUsageError
from torchloom.fabric.data import prepare_dataloader, rebuild_dataloader, seed_worker

from .helpers import env
from .helpers.datasets import numbers
from .helpers.recorders import RecordingStrategy, SplittingStrategy

RANK_1_OF_2 = {"num_replicas": 2, "rank": 1}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    env.clear(monkeypatch)


def collate(batch: list[Any]) -> list[Any]:
    return batch


def test_nothing_to_change_returns_the_same_loader() -> None:
    loader = DataLoader(numbers(10), batch_size=2, num_workers=2)
    assert prepare_dataloader(loader, None, rank=0) is loader  # no split, workers not seeded


def test_a_sequential_loader_gets_an_unshuffled_distributed_sampler_and_keeps_its_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TORCHLOOM_GLOBAL_SEED", "17")
    generator = torch.Generator()
    loader = DataLoader(
        numbers(10),
        batch_size=3,
        drop_last=True,
        collate_fn=collate,
        num_workers=1,
        pin_memory=False,
        timeout=5.0,
        persistent_workers=True,
        prefetch_factor=4,
        generator=generator,
    )
    prepared = prepare_dataloader(loader, RANK_1_OF_2, rank=1)
    sampler = prepared.sampler
    assert isinstance(sampler, DistributedSampler) and not sampler.shuffle and sampler.seed == 17
    assert (sampler.num_replicas, sampler.rank) == (2, 1)
    assert (prepared.batch_size, prepared.drop_last, prepared.collate_fn) == (3, True, collate)
    assert (prepared.num_workers, prepared.timeout, prepared.persistent_workers, prepared.prefetch_factor) == (
        1,
        5.0,
        True,
        4,
    )
    assert prepared.generator is generator and prepared.dataset is loader.dataset
    assert list(prepared) == [[1, 3, 5]]  # rank 1's half, in order; the short last batch dropped


def test_a_shuffled_loader_gets_a_shuffled_distributed_sampler() -> None:
    prepared = prepare_dataloader(DataLoader(numbers(10), batch_size=5, shuffle=True), RANK_1_OF_2, rank=1)
    assert isinstance(prepared.sampler, DistributedSampler) and prepared.sampler.shuffle
    assert prepared.sampler.seed == 0  # no TORCHLOOM_GLOBAL_SEED: torch's default
    other = prepare_dataloader(DataLoader(numbers(10), batch_size=5, shuffle=True), {"num_replicas": 2, "rank": 0}, 0)
    assert sorted(next(iter(prepared)).tolist() + next(iter(other)).tolist()) == list(range(10))


class EveryThird(Sampler[int]):
    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self) -> Iterator[int]:
        return iter(range(0, self.size, 3))

    def __len__(self) -> int:
        return len(range(0, self.size, 3))


def test_custom_samplers_are_wrapped_keeping_their_order() -> None:
    dataset = numbers(12)
    prepared = prepare_dataloader(DataLoader(dataset, sampler=EveryThird(12), batch_size=4), RANK_1_OF_2, rank=1)
    assert isinstance(prepared.sampler, DistributedSamplerWrapper)
    assert [batch.tolist() for batch in prepared] == [[3, 9]]  # of 0, 3, 6, 9: every second from the second
    with_replacement = RandomSampler(range(12), replacement=True, num_samples=4)
    assert isinstance(distributed(with_replacement), DistributedSamplerWrapper)
    assert isinstance(distributed(WeightedRandomSampler([1.0] * 12, 4)), DistributedSamplerWrapper)


def distributed(sampler: Sampler[Any]) -> Any:
    return prepare_dataloader(DataLoader(numbers(12), sampler=sampler), RANK_1_OF_2, rank=1).sampler


class PairBatches(Sampler[list[int]]):
    def __iter__(self) -> Iterator[list[int]]:
        return iter([[0, 1], [2, 3], [4, 5], [6, 7]])

    def __len__(self) -> int:
        return 4


def test_a_custom_batch_sampler_is_split_by_batches() -> None:
    prepared = prepare_dataloader(DataLoader(numbers(8), batch_sampler=PairBatches()), RANK_1_OF_2, rank=1)
    assert isinstance(prepared.batch_sampler, DistributedSamplerWrapper)
    assert [batch.tolist() for batch in prepared] == [[2, 3], [6, 7]]


def test_split_data_and_iterable_datasets_are_left_alone() -> None:
    dataset = numbers(8)
    own = DataLoader(dataset, sampler=DistributedSampler(dataset, num_replicas=2, rank=0))
    assert prepare_dataloader(own, RANK_1_OF_2, rank=1) is own

    class Stream(IterableDataset[int]):
        def __iter__(self) -> Iterator[int]:
            return iter(range(3))

    stream = DataLoader(Stream())
    assert prepare_dataloader(stream, RANK_1_OF_2, rank=1) is stream


def test_a_loader_without_batching_keeps_batch_size_none() -> None:
    prepared = prepare_dataloader(DataLoader(numbers(4), batch_size=None), RANK_1_OF_2, rank=1)
    assert prepared.batch_size is None and isinstance(prepared.sampler, DistributedSampler)
    assert list(prepared) == [1, 3]


class TaggedLoader(DataLoader[Any]):
    def __init__(self, dataset: Dataset[Any], tag: str = "default", **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.tag = tag


class NeedsName(DataLoader[Any]):
    def __init__(self, dataset: Dataset[Any], name: str, batch_size: int = 1) -> None:
        super().__init__(dataset, batch_size=batch_size)
        self.name = name


def test_dataloader_subclasses_are_rebuilt_or_refused_with_a_way_out() -> None:
    rebuilt = rebuild_dataloader(TaggedLoader(numbers(4), batch_size=2), shuffle=False)
    assert type(rebuilt) is TaggedLoader and rebuilt.batch_size == 2
    with pytest.raises(ConfigurationError, match=r"needs \['name'\].*use_distributed_sampler=False"):
        prepare_dataloader(NeedsName(numbers(4), name="x"), RANK_1_OF_2, rank=1)


def test_workers_are_seeded_after_seed_everything_with_workers() -> None:
    Fabric.seed_everything(5, workers=True)
    loader = DataLoader(numbers(4), num_workers=2)
    prepared = prepare_dataloader(loader, None, rank=1)
    assert isinstance(prepared.worker_init_fn, functools.partial)
    assert prepared.worker_init_fn.func is seed_worker and prepared.worker_init_fn.keywords == {"rank": 1}
    own = DataLoader(numbers(4), num_workers=2, worker_init_fn=print)
    assert prepare_dataloader(own, None, rank=1) is own  # the user's own init function is kept
    no_workers = DataLoader(numbers(4))
    assert prepare_dataloader(no_workers, None, rank=1) is no_workers


def draws() -> tuple[float, float, float]:
    return torch.rand(()).item(), random.random(), float(np.random.rand())


def test_seed_worker_gives_distinct_repeatable_streams() -> None:
    def seeded(base: int, worker_id: int, rank: int) -> tuple[float, float, float]:
        torch.manual_seed(base + worker_id)  # what torch does in worker `worker_id` before the init function
        seed_worker(worker_id, rank)
        return draws()

    first = seeded(1000, 0, 0)
    assert seeded(1000, 0, 0) == first
    others = [seeded(1000, 1, 0), seeded(1000, 0, 1), seeded(2000, 0, 0)]
    for other in others:
        assert all(a != b for a, b in zip(first, other)), (first, other)


class Draws(Dataset[tuple[float, float]]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[float, float]:
        return torch.rand(()).item(), float(np.random.rand())


def test_real_workers_of_different_ranks_draw_different_numbers() -> None:
    def worker_draws(rank: int) -> list[tuple[float, float]]:
        Fabric.seed_everything(3, workers=True)  # every rank seeds alike
        loader = prepare_dataloader(DataLoader(Draws(), batch_size=1, num_workers=2), None, rank=rank)
        return [(float(t), float(n)) for t, n in loader]

    rank0, rank1 = worker_draws(0), worker_draws(1)
    assert worker_draws(0) == rank0  # repeatable
    assert len({t for t, _ in rank0 + rank1}) == 8 and len({n for _, n in rank0 + rank1}) == 8, (rank0, rank1)


# ---------------------------------------------------------------------- through Fabric
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
