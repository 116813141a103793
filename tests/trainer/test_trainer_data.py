"""Dataloaders: where they come from, how they are split over processes, how batches are counted and sized."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)

from torchloom.core.distributed import DistributedSamplerWrapper
from torchloom.core.errors import ConfigurationError
from torchloom.trainer import LoomDataModule
from torchloom.trainer.data import (
    count_batches,
    infer_batch_size,
    set_sampler_epoch,
    to_loader_list,
    with_distributed_sampler,
)

from .engine_models import Regressor, dataset, loader, quiet_trainer

SPLIT = {"num_replicas": 2, "rank": 1}


class Stream(IterableDataset[torch.Tensor]):
    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(torch.arange(10.0).view(5, 2))


def test_train_loaders_get_a_shuffling_distributed_sampler_and_eval_loaders_an_ordered_one() -> None:
    train = with_distributed_sampler(loader(16, batch_size=2, shuffle=True), SPLIT, train=True)
    assert isinstance(train, DataLoader) and isinstance(train.sampler, DistributedSampler)
    assert train.sampler.shuffle and train.sampler.rank == 1 and train.batch_size == 2 and len(train) == 4
    ordered = with_distributed_sampler(loader(16, batch_size=2, shuffle=True), SPLIT, train=False)
    assert not ordered.sampler.shuffle  # type: ignore[attr-defined]
    sequential = with_distributed_sampler(loader(16, batch_size=2), SPLIT, train=True)
    assert not sequential.sampler.shuffle  # type: ignore[attr-defined]
    first = next(iter(sequential))[0]  # rank 1 of 2 takes samples 1, 3, 5, ...
    assert torch.equal(first, torch.stack([dataset(16)[1][0], dataset(16)[3][0]]))


def test_a_custom_sampler_is_wrapped_and_iterables_and_distributed_loaders_are_kept() -> None:
    weighted = DataLoader(dataset(16), batch_size=4, sampler=WeightedRandomSampler([1.0] * 16, 16))
    wrapped = with_distributed_sampler(weighted, SPLIT, train=True)
    assert isinstance(wrapped.sampler, DistributedSamplerWrapper) and len(wrapped.sampler) == 8  # type: ignore[attr-defined]
    stream = DataLoader(Stream(), batch_size=2)
    assert with_distributed_sampler(stream, SPLIT, train=True) is stream
    already = DataLoader(dataset(16), sampler=DistributedSampler(dataset(16), num_replicas=2, rank=0))
    assert with_distributed_sampler(already, SPLIT, train=True) is already
    plain_list = [1, 2, 3]
    assert with_distributed_sampler(plain_list, SPLIT, train=True) is plain_list


def test_batch_samplers_and_loader_subclasses() -> None:
    by_batches = DataLoader(dataset(16), batch_sampler=BatchSampler(SequentialSampler(range(16)), 4, drop_last=False))
    rebuilt = with_distributed_sampler(by_batches, SPLIT, train=True)
    assert isinstance(rebuilt, DataLoader) and isinstance(rebuilt.batch_sampler, BatchSampler)
    assert isinstance(rebuilt.batch_sampler.sampler, DistributedSampler)

    class EveryOther(Sampler[list[int]]):
        def __iter__(self) -> Iterator[list[int]]:
            return iter([[0, 2], [4, 6]])

        def __len__(self) -> int:
            return 2

    with pytest.raises(ConfigurationError, match=r"custom batch sampler EveryOther.*use_distributed_sampler=False"):
        with_distributed_sampler(DataLoader(dataset(16), batch_sampler=EveryOther()), SPLIT, train=True)

    class Tagged(DataLoader[Any]):
        pass

    assert type(with_distributed_sampler(Tagged(dataset(8), batch_size=2), SPLIT, train=True)) is Tagged

    class NeedsMore(DataLoader[Any]):
        def __init__(self, dataset: Any, tag: str, **kwargs: Any) -> None:
            super().__init__(dataset, **kwargs)

    with pytest.raises(ConfigurationError, match="could not rebuild your NeedsMore"):
        with_distributed_sampler(NeedsMore(dataset(8), "x", batch_size=2), SPLIT, train=True)


def test_set_sampler_epoch_reshuffles_a_distributed_sampler() -> None:
    train = with_distributed_sampler(loader(32, batch_size=4, shuffle=True), SPLIT, train=True)
    set_sampler_epoch(train, 0)
    first = list(iter(train.sampler))  # type: ignore[attr-defined]
    set_sampler_epoch(train, 1)
    assert list(iter(train.sampler)) != first  # type: ignore[attr-defined]
    set_sampler_epoch([1, 2], 3)  # no sampler: nothing to do


def test_count_batches() -> None:
    data = loader(40, batch_size=4)  # 10 batches
    assert count_batches(data, 1.0, "limit") == 10 and count_batches(data, 0.25, "limit") == 2
    assert count_batches(data, 3, "limit") == 3 and count_batches(data, 50, "limit") == 10
    stream = DataLoader(Stream(), batch_size=2)
    assert math.isinf(count_batches(stream, 1.0, "limit")) and count_batches(stream, 2, "limit") == 2
    with pytest.raises(
        ConfigurationError, match=r"limit_val_batches=0.5 is a fraction, but the dataloader has no length"
    ):
        count_batches(stream, 0.5, "limit_val_batches")


def test_infer_batch_size() -> None:
    assert infer_batch_size((torch.zeros(5, 3), torch.zeros(5))) == 5
    assert infer_batch_size({"text": ["a", "b"], "ids": torch.zeros(7, 2)}) == 7
    assert infer_batch_size(torch.tensor(3.0)) == 1 and infer_batch_size(["a"]) == 1


def test_to_loader_list() -> None:
    one = loader(8)
    assert to_loader_list(one, "val", "here") == [one]
    assert to_loader_list([one, one], "val", "here") == [one, one]
    with pytest.raises(ConfigurationError, match="gave 2 training dataloaders; the Trainer trains on one"):
        to_loader_list([one, one], "train", "fit(train_dataloaders=...)")
    with pytest.raises(ConfigurationError, match="gave 3 \\(int\\), which is not a dataloader"):
        to_loader_list(3, "val", "here")


def test_arguments_win_over_the_module_and_unsized_loaders_train() -> None:
    class OwnData(Regressor):
        def train_dataloader(self) -> Any:
            return loader(40)

    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(OwnData(), loader(8))
    assert trainer.num_training_batches == 2
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(OwnData())
    assert trainer.num_training_batches == 10

    class StreamModule(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            output: torch.Tensor = self.layer(torch.cat([batch, batch], dim=1)).sum()
            return output

    trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(StreamModule(), DataLoader(Stream(), batch_size=2))  # 3 batches of unknown number
    assert trainer.global_step == 4 and math.isinf(trainer.num_training_batches)


def test_prepare_data_runs_before_setup_once() -> None:
    order: list[str] = []

    class Data(LoomDataModule):
        def prepare_data(self) -> None:
            order.append("prepare")

        def setup(self, stage: str) -> None:
            order.append(f"setup {stage}")

        def train_dataloader(self) -> Any:
            return loader(8)

    quiet_trainer(max_epochs=1).fit(Regressor(), datamodule=Data())
    assert order == ["prepare", "setup fit"]
