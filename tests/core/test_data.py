"""Dataloader preparation shared by both products: distributed samplers, rebuilt loaders, seeded workers, epochs.

Single process: ``sampler_kwargs`` tell this process it is rank 1 (or 0) of 2, which is all a sampler needs.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import pytest
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
    WeightedRandomSampler,
)

from torchloom.core.data import prepare_dataloader, rebuild_dataloader, seed_worker, set_sampler_epoch
from torchloom.core.errors import ConfigurationError
from torchloom.core.samplers import DistributedSamplerWrapper
from torchloom.core.utils.seed import SEED_ENV, SEED_WORKERS_ENV, seed_everything

RANK_0_OF_2 = {"num_replicas": 2, "rank": 0}
RANK_1_OF_2 = {"num_replicas": 2, "rank": 1}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (SEED_ENV, SEED_WORKERS_ENV):
        monkeypatch.setenv(name, "")  # recorded, so what a test's seed_everything sets is undone afterwards
        monkeypatch.delenv(name)


def numbers(count: int) -> Dataset[int]:
    """``0 .. count-1``: a list is a map-style dataset (len and indexing), typed as one."""
    return cast(Dataset[int], list(range(count)))


def collate(batch: list[Any]) -> list[Any]:
    return batch


def batches(loader: DataLoader[Any]) -> list[list[int]]:
    return [batch.tolist() for batch in loader]


# ---------------------------------------------------------------------- samplers
def test_nothing_to_change_returns_the_same_loader() -> None:
    loader = DataLoader(numbers(10), batch_size=2, num_workers=2)
    assert prepare_dataloader(loader, None, rank=0) is loader  # no split, workers not seeded


def test_a_sequential_loader_gets_an_unshuffled_distributed_sampler_and_keeps_its_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SEED_ENV, "17")
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


def test_a_shuffled_loader_gets_a_shuffled_distributed_sampler_unless_ordered() -> None:
    prepared = prepare_dataloader(DataLoader(numbers(10), batch_size=5, shuffle=True), RANK_1_OF_2, rank=1)
    assert isinstance(prepared.sampler, DistributedSampler) and prepared.sampler.shuffle
    assert prepared.sampler.seed == 0  # no TORCHLOOM_GLOBAL_SEED: torch's default
    other = prepare_dataloader(DataLoader(numbers(10), batch_size=5, shuffle=True), RANK_0_OF_2, rank=0)
    assert sorted(batches(prepared)[0] + batches(other)[0]) == list(range(10))  # the ranks share the epoch out
    ordered = prepare_dataloader(DataLoader(numbers(10), batch_size=5, shuffle=True), RANK_1_OF_2, 1, ordered=True)
    assert isinstance(ordered.sampler, DistributedSampler) and not ordered.sampler.shuffle
    assert batches(ordered) == [[1, 3, 5, 7, 9]]


class EveryThird(Sampler[int]):
    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self) -> Iterator[int]:
        return iter(range(0, self.size, 3))

    def __len__(self) -> int:
        return len(range(0, self.size, 3))


def distributed(sampler: Sampler[Any], ordered: bool = False) -> Any:
    return prepare_dataloader(DataLoader(numbers(12), sampler=sampler), RANK_1_OF_2, rank=1, ordered=ordered).sampler


def test_custom_samplers_are_wrapped_keeping_their_draws() -> None:
    prepared = prepare_dataloader(DataLoader(numbers(12), sampler=EveryThird(12), batch_size=4), RANK_1_OF_2, rank=1)
    assert isinstance(prepared.sampler, DistributedSamplerWrapper)
    assert batches(prepared) == [[3, 9]]  # of 0, 3, 6, 9: every second from the second
    with_replacement = RandomSampler(range(12), replacement=True, num_samples=4)
    assert isinstance(distributed(with_replacement), DistributedSamplerWrapper)
    assert isinstance(distributed(RandomSampler(range(12), num_samples=5)), DistributedSamplerWrapper)
    weighted = distributed(WeightedRandomSampler([1.0] * 12, 12), ordered=True)
    assert isinstance(weighted, DistributedSamplerWrapper) and len(weighted) == 6
    assert isinstance(distributed(SequentialSampler(range(6))), DistributedSampler)
    assert len(distributed(SequentialSampler(range(6)))) == 3  # the sampler's own length, not the dataset's


class PairBatches(Sampler[list[int]]):
    def __iter__(self) -> Iterator[list[int]]:
        return iter([[0, 1], [2, 3], [4, 5], [6, 7]])

    def __len__(self) -> int:
        return 4


def test_batch_samplers() -> None:
    custom = prepare_dataloader(DataLoader(numbers(8), batch_sampler=PairBatches()), RANK_1_OF_2, rank=1)
    assert isinstance(custom.batch_sampler, DistributedSamplerWrapper)
    assert batches(custom) == [[2, 3], [6, 7]]  # every second batch
    # a plain BatchSampler passed in: its sampler and batch size are the real ones, not the loader's defaults
    given = BatchSampler(RandomSampler(range(16)), batch_size=4, drop_last=True)
    plain = prepare_dataloader(DataLoader(numbers(16), batch_sampler=given), RANK_1_OF_2, rank=1)
    assert isinstance(plain.sampler, DistributedSampler) and plain.sampler.shuffle
    assert (plain.batch_size, plain.drop_last, len(plain)) == (4, True, 2)
    other = prepare_dataloader(DataLoader(numbers(16), batch_sampler=given), RANK_0_OF_2, rank=0)
    assert sorted(i for batch in batches(plain) + batches(other) for i in batch) == list(range(16))
    split = BatchSampler(DistributedSampler(numbers(16), num_replicas=2, rank=0), 4, False)
    assert prepare_dataloader(DataLoader(numbers(16), batch_sampler=split), RANK_1_OF_2, rank=1).batch_sampler is split


def test_split_data_iterable_datasets_and_unbatched_loaders() -> None:
    dataset = numbers(8)
    own = DataLoader(dataset, sampler=DistributedSampler(dataset, num_replicas=2, rank=0))
    assert prepare_dataloader(own, RANK_1_OF_2, rank=1) is own

    class Stream(IterableDataset[int]):
        def __iter__(self) -> Iterator[int]:
            return iter(range(3))

    stream = DataLoader(Stream())
    assert prepare_dataloader(stream, RANK_1_OF_2, rank=1) is stream
    unbatched = prepare_dataloader(DataLoader(numbers(4), batch_size=None), RANK_1_OF_2, rank=1)
    assert unbatched.batch_size is None and isinstance(unbatched.sampler, DistributedSampler)
    assert list(unbatched) == [1, 3]


# ---------------------------------------------------------------------- rebuilding subclasses
class TaggedLoader(DataLoader[Any]):
    def __init__(self, dataset: Dataset[Any], tag: str = "default", **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.tag = tag


class KeepsName(DataLoader[Any]):
    def __init__(self, dataset: Dataset[Any], name: str, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.name = name


class ForgetsName(DataLoader[Any]):
    def __init__(self, dataset: Dataset[Any], name: str, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)


class FixedSampler(DataLoader[Any]):
    def __init__(self, dataset: Dataset[Any], batch_size: int = 1) -> None:
        super().__init__(dataset, batch_size=batch_size)


class FixedWorkers(DataLoader[Any]):
    def __init__(self, dataset: Dataset[Any]) -> None:
        super().__init__(dataset, num_workers=2)


class Picky(DataLoader[Any]):
    def __init__(self, dataset: Dataset[Any], batch_size: int = 1, **kwargs: Any) -> None:
        if "sampler" in kwargs:
            raise TypeError("Picky takes no sampler")
        super().__init__(dataset, batch_size=batch_size, **kwargs)


def test_dataloader_subclasses_are_rebuilt_with_their_own_arguments() -> None:
    rebuilt = rebuild_dataloader(TaggedLoader(numbers(4), tag="mine", batch_size=2), shuffle=False)
    assert type(rebuilt) is TaggedLoader and rebuilt.batch_size == 2 and rebuilt.tag == "mine"
    prepared = prepare_dataloader(KeepsName(numbers(4), name="x", batch_size=2), RANK_1_OF_2, rank=1)
    assert type(prepared) is KeepsName and prepared.name == "x" and isinstance(prepared.sampler, DistributedSampler)
    assert batches(prepared) == [[1, 3]]


def test_dataloader_subclasses_that_cannot_be_rebuilt_are_refused_with_a_way_out() -> None:
    with pytest.raises(ConfigurationError, match=r"Cannot rebuild ForgetsName: its __init__ needs \['name'\]") as info:
        prepare_dataloader(ForgetsName(numbers(4), name="x"), RANK_1_OF_2, rank=1)
    assert "use_distributed_sampler=False" in str(info.value)
    # dropping the new sampler would leave the data unsplit without a word
    with pytest.raises(ConfigurationError, match=r"Cannot rebuild FixedSampler: its __init__ takes no \['sampler'\]"):
        prepare_dataloader(FixedSampler(numbers(4)), RANK_1_OF_2, rank=1)
    with pytest.raises(ConfigurationError, match=r"Cannot rebuild Picky: Picky takes no sampler.*use_distributed"):
        prepare_dataloader(Picky(numbers(4)), RANK_1_OF_2, rank=1)


# ---------------------------------------------------------------------- worker seeding
def test_workers_are_seeded_after_seed_everything_with_workers() -> None:
    assert prepare_dataloader(DataLoader(numbers(4), num_workers=2), None, rank=1).worker_init_fn is None
    seed_everything(5, workers=True)
    prepared = prepare_dataloader(DataLoader(numbers(4), num_workers=2), None, rank=1)
    assert isinstance(prepared.worker_init_fn, functools.partial)
    assert prepared.worker_init_fn.func is seed_worker and prepared.worker_init_fn.keywords == {"rank": 1}
    own = DataLoader(numbers(4), num_workers=2, worker_init_fn=print)
    assert prepare_dataloader(own, None, rank=1) is own  # the user's own init function is kept
    no_workers = DataLoader(numbers(4))
    assert prepare_dataloader(no_workers, None, rank=1) is no_workers
    fixed = FixedWorkers(numbers(4))
    with pytest.warns(UserWarning, match="FixedWorkers.__init__ takes no worker_init_fn, so its workers are not"):
        assert prepare_dataloader(fixed, None, rank=1) is fixed  # seeding is skipped, the run goes on
    seed_everything(5, workers=False)
    assert prepare_dataloader(DataLoader(numbers(4), num_workers=2), None, rank=1).worker_init_fn is None


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
        seed_everything(3, workers=True)  # every rank seeds alike
        loader = prepare_dataloader(DataLoader(Draws(), batch_size=1, num_workers=2), None, rank=rank)
        return [(float(t), float(n)) for t, n in loader]

    rank0, rank1 = worker_draws(0), worker_draws(1)
    assert worker_draws(0) == rank0  # repeatable
    assert len({t for t, _ in rank0 + rank1}) == 8 and len({n for _, n in rank0 + rank1}) == 8, (rank0, rank1)


# ---------------------------------------------------------------------- epochs
def test_set_sampler_epoch_reshuffles_every_kind_of_distributed_sampler() -> None:
    shuffled = prepare_dataloader(DataLoader(numbers(32), batch_size=4, shuffle=True), RANK_1_OF_2, rank=1)
    set_sampler_epoch(shuffled, 0)
    first = batches(shuffled)
    set_sampler_epoch(shuffled, 1)
    assert batches(shuffled) != first
    set_sampler_epoch(shuffled, 0)
    assert batches(shuffled) == first  # the epoch, not the number of passes, decides

    by_batches = prepare_dataloader(DataLoader(numbers(8), batch_sampler=PairBatches()), RANK_1_OF_2, rank=1)
    set_sampler_epoch(by_batches, 7)
    assert by_batches.batch_sampler.epoch == 7  # type: ignore[union-attr]
    set_sampler_epoch([1, 2], 3)  # no sampler: nothing to do
