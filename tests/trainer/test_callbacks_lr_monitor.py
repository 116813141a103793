"""LearningRateMonitor: names, values per interval, momentum, a real CSV logger, errors."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from torchloom.core.errors import ConfigurationError
from torchloom.core.loggers import CSVLogger
from torchloom.trainer.callbacks import LearningRateMonitor

from .test_callbacks_fakes import FakeTrainer


class Recorder:
    """A logger that remembers every call."""

    version = 0

    def __init__(self) -> None:
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))


def config(scheduler: Any, interval: str = "epoch", name: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(scheduler=scheduler, interval=interval, name=name, frequency=1)


def make_trainer(tmp_path: Path, monitor: LearningRateMonitor, logger: Any) -> FakeTrainer:
    return FakeTrainer(tmp_path, [monitor], loggers=[logger])


def test_step_scheduler_is_logged_every_step_and_epoch_scheduler_every_epoch(tmp_path: Path) -> None:
    params = [nn.Parameter(torch.zeros(1))]
    sgd = torch.optim.SGD(params, lr=1.0)
    adam = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.5)
    logger = Recorder()
    trainer = make_trainer(tmp_path, LearningRateMonitor(), logger)
    step_sched = torch.optim.lr_scheduler.StepLR(sgd, step_size=1, gamma=0.5)
    trainer.optimizers = [sgd, adam]
    trainer.lr_scheduler_configs = [config(step_sched, "step")]
    trainer.call("on_train_start")
    trainer.call("on_train_epoch_start")  # epoch start: only the unscheduled Adam
    for _ in range(2):
        trainer.call("on_train_batch_start", None, 0)
        sgd.step()
        step_sched.step()
        trainer.global_step += 1
    assert logger.rows == [
        (0, {"lr-Adam": 0.5}),
        (0, {"lr-SGD": 1.0, "lr-Adam": 0.5}),
        (1, {"lr-SGD": 0.5, "lr-Adam": 0.5}),
    ]


def test_interval_epoch_logs_every_scheduler_once_per_epoch(tmp_path: Path) -> None:
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    logger = Recorder()
    trainer = make_trainer(tmp_path, LearningRateMonitor(logging_interval="epoch"), logger)
    trainer.optimizers = [sgd]
    trainer.lr_scheduler_configs = [config(torch.optim.lr_scheduler.StepLR(sgd, 1), "step", name="my-lr")]
    trainer.fit([None, None], steps_per_epoch=3)
    assert logger.rows == [(0, {"my-lr": 0.1}), (3, {"my-lr": 0.1})]


def test_names_for_repeated_classes_param_groups_and_momentum(tmp_path: Path) -> None:
    a = nn.Parameter(torch.zeros(1))
    b = nn.Parameter(torch.zeros(1))
    groups: list[dict[str, Any]] = [{"params": [a]}, {"params": [b], "lr": 0.2, "name": "head"}]
    first = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    second = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.3)
    adam = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.4, betas=(0.8, 0.99))
    logger = Recorder()
    monitor = LearningRateMonitor(logging_interval="step", log_momentum=True)
    trainer = make_trainer(tmp_path, monitor, logger)
    trainer.optimizers = [first, second, adam]
    trainer.call("on_train_start")
    trainer.call("on_train_batch_start", None, 0)
    trainer.call("on_train_batch_start", None, 1)  # same global step (accumulation): logged once
    assert logger.rows == [
        (
            0,
            {
                "lr-SGD/pg1": 0.1,
                "lr-SGD/pg1-momentum": 0.9,
                "lr-SGD/head": 0.2,
                "lr-SGD/head-momentum": 0.9,
                "lr-SGD-1": 0.3,
                "lr-SGD-1-momentum": 0.0,
                "lr-Adam": 0.4,
                "lr-Adam-momentum": 0.8,
            },
        )
    ]
    assert monitor.last_logged["lr-Adam"] == 0.4


def test_values_reach_a_real_csv_logger(tmp_path: Path) -> None:
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = make_trainer(tmp_path, LearningRateMonitor(), logger)
    scheduler = torch.optim.lr_scheduler.StepLR(sgd, step_size=1, gamma=0.1)
    trainer.optimizers = [sgd]
    trainer.lr_scheduler_configs = [config(scheduler, "epoch")]
    trainer.call("on_train_start")
    for epoch in range(3):
        trainer.global_step = epoch * 2
        trainer.call("on_train_epoch_start")
        sgd.step()
        scheduler.step()
    logger.finalize()
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), float(r["lr-SGD"])) for r in rows] == [(0, 1.0), (2, 0.1), (4, pytest.approx(0.01))]


def test_momentum_without_any_momentum_warns(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, LearningRateMonitor(log_momentum=True), Recorder())
    trainer.optimizers = [torch.optim.Adagrad([nn.Parameter(torch.zeros(1))])]
    with pytest.warns(UserWarning, match="no optimizer has momentum"):
        trainer.call("on_train_start")


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"logging_interval='batch'.*None, 'step', 'epoch'"):
        LearningRateMonitor(logging_interval="batch")
    with pytest.raises(ConfigurationError, match="no logger"):
        FakeTrainer(tmp_path, [LearningRateMonitor()]).call("on_train_start")


def test_step_logging_follows_log_every_n_steps(tmp_path: Path) -> None:
    logger = Recorder()
    trainer = make_trainer(tmp_path, LearningRateMonitor(logging_interval="step"), logger)
    trainer.optimizers = [torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)]
    trainer.log_every_n_steps = 2
    trainer.fit([None, None], steps_per_epoch=3)
    assert [step for step, _ in logger.rows] == [0, 2, 4]
