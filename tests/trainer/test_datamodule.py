"""LoomDataModule: default hooks, state, hyper-parameters, attachment to a trainer."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from torchloom.core.errors import ConfigurationError
from torchloom.trainer.datamodule import LoomDataModule
from torchloom.trainer.hparams import check_hparams_serializable
from torchloom.trainer.module import is_overridden


class Digits(LoomDataModule):
    def __init__(self, batch_size: int = 4, root: str = "data", transform: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore="transform")
        self.seen_epochs = 0

    def setup(self, stage: str) -> None:
        self.data = TensorDataset(torch.arange(10.0))

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=self.hparams.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"seen_epochs": self.seen_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seen_epochs = state_dict["seen_epochs"]


def test_base_hooks_are_no_ops_and_define_no_dataloaders() -> None:
    dm = LoomDataModule()
    for name, args in [("prepare_data", ()), ("setup", ("fit",)), ("teardown", ("fit",))]:
        assert getattr(dm, name)(*args) is None
    assert dm.state_dict() == {}
    dm.load_state_dict({"anything": 1})
    for name in ("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader"):
        assert getattr(dm, name, None) is None


def test_subclass_dataloaders_state_and_hparams() -> None:
    dm = Digits(batch_size=5, transform=lambda x: x)
    assert dict(dm.hparams) == {"batch_size": 5, "root": "data"}
    check_hparams_serializable(dm.hparams)
    dm.setup("fit")
    assert [len(b[0]) for b in dm.train_dataloader()] == [5, 5]
    assert getattr(dm, "val_dataloader", None) is None
    assert is_overridden(dm, "train_dataloader", LoomDataModule) and not is_overridden(dm, "setup", Digits)
    dm.seen_epochs = 3
    other = Digits()
    other.load_state_dict(dm.state_dict())
    assert other.seen_epochs == 3


def test_trainer_attachment_and_pickling() -> None:
    dm = Digits()
    with pytest.raises(ConfigurationError, match=r"Digits is not attached to a Trainer; pass it as trainer.fit"):
        _ = dm.trainer
    trainer = object()
    dm._attach(trainer)  # type: ignore[arg-type]
    assert dm.trainer is trainer
    for clone in (pickle.loads(pickle.dumps(dm)), copy.deepcopy(dm)):
        assert clone._trainer is None and clone.hparams == dm.hparams
    dm._detach()
    with pytest.raises(ConfigurationError):
        _ = dm.trainer
