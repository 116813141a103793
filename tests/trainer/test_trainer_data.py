"""Dataloaders: where they come from, how they are split over processes, how batches are counted and sized."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, Sampler

from torchloom.core.data import seed_worker
from torchloom.core.errors import ConfigurationError
from torchloom.core.samplers import DistributedSamplerWrapper
from torchloom.core.utils.seed import SEED_WORKERS_ENV
from torchloom.trainer import LoomDataModule
from torchloom.trainer.data import count_batches, infer_batch_size, prepare_loader, to_loader_list
from torchloom.trainer.data_source import DataSource

from .engine_models import Regressor, dataset, loader, quiet_trainer

SPLIT = {"num_replicas": 2, "rank": 1}


class Stream(IterableDataset[torch.Tensor]):
    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(torch.arange(10.0).view(5, 2))


def test_train_loaders_keep_shuffling_and_eval_loaders_are_split_in_order() -> None:
    train = prepare_loader(loader(16, batch_size=2, shuffle=True), SPLIT, 1, "train")
    assert isinstance(train, DataLoader) and isinstance(train.sampler, DistributedSampler)
    assert train.sampler.shuffle and train.sampler.rank == 1 and train.batch_size == 2 and len(train) == 4
    for kind in ("val", "test", "predict"):
        ordered = prepare_loader(loader(16, batch_size=2, shuffle=True), SPLIT, 1, kind)
        assert not ordered.sampler.shuffle, kind  # type: ignore[attr-defined]
    sequential = prepare_loader(loader(16, batch_size=2), SPLIT, 1, "train")
    assert not sequential.sampler.shuffle  # type: ignore[attr-defined]
    first = next(iter(sequential))[0]  # rank 1 of 2 takes samples 1, 3, 5, ...
    assert torch.equal(first, torch.stack([dataset(16)[1][0], dataset(16)[3][0]]))
    plain_list = [1, 2, 3]  # any iterable of batches is used as it is
    assert prepare_loader(plain_list, SPLIT, 1, "train") is plain_list


def test_loaders_are_split_on_the_ranks_of_a_ddp_strategy_custom_batch_samplers_too() -> None:
    class EveryOther(Sampler[list[int]]):
        def __iter__(self) -> Iterator[list[int]]:
            return iter([[0, 2], [4, 6], [8, 10], [12, 14]])

        def __len__(self) -> int:
            return 4

    trainer = quiet_trainer(strategy="ddp", devices=2)
    source = DataSource({"val": DataLoader(dataset(16), batch_sampler=EveryOther())}, None, "validate")
    source.load(trainer, "val", required=True)
    (split,) = source.loaders["val"]
    assert isinstance(split.batch_sampler, DistributedSamplerWrapper) and source.counts["val"] == [2]  # type: ignore[attr-defined]

    class NeedsMore(DataLoader[Any]):
        def __init__(self, dataset: Any, tag: str, **kwargs: Any) -> None:
            super().__init__(dataset, **kwargs)

    source = DataSource({"train": NeedsMore(dataset(8), "x", batch_size=2)}, None, "fit")
    with pytest.raises(ConfigurationError, match=r"Cannot rebuild NeedsMore.*use_distributed_sampler=False"):
        source.load(trainer, "train", required=True)


def test_workers_are_seeded_after_seed_everything_with_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SEED_WORKERS_ENV, "1")  # what seed_everything(seed, workers=True) exports
    source = DataSource({"train": DataLoader(dataset(8), num_workers=2)}, None, "fit")
    source.load(quiet_trainer(), "train", required=True)  # one process: nothing to split, workers still seeded
    init = source.train_loader.worker_init_fn  # type: ignore[attr-defined]
    assert isinstance(init, functools.partial) and init.func is seed_worker and init.keywords == {"rank": 0}
    monkeypatch.setenv(SEED_WORKERS_ENV, "0")
    source.load(quiet_trainer(), "train", required=True)
    assert source.train_loader.worker_init_fn is None  # type: ignore[attr-defined]


def test_fit_tells_the_sampler_each_epoch() -> None:
    data = dataset(8)
    sampler: DistributedSampler[Any] = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True)
    epochs: list[int] = []

    class Recording(Regressor):
        def on_train_epoch_start(self) -> None:
            epochs.append(sampler.epoch)

    quiet_trainer(max_epochs=3).fit(Recording(), DataLoader(data, batch_size=4, sampler=sampler))
    assert epochs == [0, 1, 2]


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
