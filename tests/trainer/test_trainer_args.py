"""Every Trainer argument changes what the run does: one test (or a few) per argument or related group."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler, RandomSampler

from torchloom.core.checkpoint.io import TorchCheckpointIO
from torchloom.core.errors import ConfigurationError
from torchloom.core.loggers.csv import CSVLogger
from torchloom.core.strategies.ddp import DDPStrategy
from torchloom.core.strategies.single_device import SingleDeviceStrategy
from torchloom.core.utils import rank_zero
from torchloom.trainer.callbacks import (
    Callback,
    LambdaCallback,
    ModelCheckpoint,
    ModelSummary,
    PreemptionCheckpoint,
    ProgressBar,
    Timer,
    TQDMProgressBar,
)
from torchloom.trainer.data_source import DataSource
from torchloom.trainer.runner import convert_sync_batchnorm

from .engine_models import Regressor, loader, quiet_trainer


class Probe(Regressor):
    """Records what each step saw."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: dict[str, list[Any]] = {"train": [], "val": [], "sanity": []}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self.layer(batch[0])
        self.seen["train"].append(
            {
                "epoch": self.current_epoch,
                "dtype": x.dtype,
                "autocast": torch.is_autocast_enabled("cpu"),
                "anomaly": torch.is_anomaly_enabled(),
                "deterministic": torch.are_deterministic_algorithms_enabled(),
            }
        )
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        kind = "sanity" if self.trainer.sanity_checking else "val"
        self.seen[kind].append(
            {"step": self.global_step, "inference": torch.is_inference_mode_enabled(), "grad": torch.is_grad_enabled()}
        )
        super().validation_step(batch, batch_idx)


def fit(trainer_kwargs: dict[str, Any], train: int = 32, val: int | None = 8, **model_kwargs: Any) -> tuple[Any, Probe]:
    model = Probe(**model_kwargs)
    trainer = quiet_trainer(**trainer_kwargs)
    trainer.fit(model, loader(train), loader(val) if val else None)
    return trainer, model


# ---------------------------------------------------------------- hardware: accelerator, strategy, devices, num_nodes


def test_accelerator_strategy_and_devices_choose_the_core_strategy(monkeypatch: pytest.MonkeyPatch) -> None:
    single = quiet_trainer()
    assert isinstance(single.strategy, SingleDeviceStrategy) and single.world_size == 1
    ddp = quiet_trainer(strategy="ddp", devices=2)
    assert isinstance(ddp.strategy, DDPStrategy) and ddp.world_size == 2 and ddp.num_devices == 2
    assert ddp.strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 0}
    with pytest.raises(
        ConfigurationError, match=r"accelerator='tpu' (needs the package 'torch_xla'|found no XLA device)"
    ):
        quiet_trainer(accelerator="tpu")
    monkeypatch.setattr(rank_zero, "_rank", 0)  # building the strategy sets this process's rank; put it back after
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setenv("NODE_RANK", "1")
    nodes = quiet_trainer(strategy="ddp", devices=2, num_nodes=2)
    assert nodes.num_nodes == 2 and nodes.world_size == 4 and nodes.node_rank == 1 and nodes.global_rank == 2


@pytest.mark.parametrize(
    ("precision", "dtype", "autocast"), [("bf16-mixed", torch.bfloat16, True), ("64-true", torch.float64, False)]
)
def test_precision_runs_the_steps_in_its_dtype(precision: str, dtype: torch.dtype, autocast: bool) -> None:
    _, model = fit({"max_steps": 1, "precision": precision}, val=None)
    (step,) = model.seen["train"]
    assert step["dtype"] == dtype and step["autocast"] is autocast


def test_plugins_reach_the_strategy(tmp_path: Path) -> None:
    class CountingIO(TorchCheckpointIO):
        saves = 0

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any) -> None:
            CountingIO.saves += 1
            super().save_checkpoint(checkpoint, path)

    trainer = quiet_trainer(max_steps=1, plugins=[CountingIO()])
    trainer.fit(Regressor(), loader(8))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    assert CountingIO.saves == 1 and (tmp_path / "a.ckpt").is_file()


# ---------------------------------------------------------------- logger, log_every_n_steps, callbacks, default_root_dir


def test_logger_and_log_every_n_steps(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, version=0)
    fit({"max_epochs": 2, "logger": logger, "log_every_n_steps": 3, "num_sanity_val_steps": 0}, train=24, lr=0.05)
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    train_steps = [int(r["step"]) for r in rows if r.get("train_loss")]
    assert train_steps == [3, 6, 9, 12]  # 12 batches, every 3rd
    assert [int(r["step"]) for r in rows if r.get("val_loss")] == [6, 12]
    assert {r["epoch"] for r in rows if r.get("val_loss")} == {"0.0", "1.0"}
    assert (Path(logger.log_dir) / "hparams.yaml").read_text().count("lr") == 1


def test_callbacks_are_called_and_module_callbacks_join_them() -> None:
    calls: list[str] = []

    class WithCallbacks(Regressor):
        def configure_callbacks(self) -> list[Any]:
            return [LambdaCallback(on_fit_end=lambda t, m: calls.append("from module"))]

    class Given(Callback):
        def on_fit_start(self, trainer: Any, module: Any) -> None:
            calls.append("given")

    replaced = LambdaCallback(on_fit_start=lambda t, m: calls.append("replaced: same type as the module's"))
    trainer = quiet_trainer(max_steps=1, callbacks=[Given(), replaced])
    trainer.fit(WithCallbacks(), loader(8))
    assert calls == ["given", "from module"]
    assert replaced not in trainer.callbacks and len(trainer.callbacks) == 2


def test_default_root_dir_holds_the_default_checkpoints(tmp_path: Path) -> None:
    trainer = quiet_trainer(max_epochs=1, default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(Regressor(), loader(8))
    assert trainer.default_root_dir == str(tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch=0-step=2.ckpt"]


def test_enable_flags_add_or_drop_the_default_callbacks(tmp_path: Path) -> None:
    everything = quiet_trainer(enable_checkpointing=True, enable_progress_bar=True, enable_model_summary=True)
    kinds = [type(c) for c in everything.callbacks]
    assert kinds == [ModelSummary, TQDMProgressBar, ModelCheckpoint, PreemptionCheckpoint]  # saves on SIGTERM
    assert quiet_trainer().callbacks == []
    with pytest.raises(ConfigurationError, match=r"enable_checkpointing=False.*ModelCheckpoint"):
        quiet_trainer(callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    mine = TQDMProgressBar()
    assert quiet_trainer(enable_progress_bar=True, callbacks=[mine]).progress_bar_callback is mine
    assert isinstance(quiet_trainer(enable_progress_bar=True).progress_bar_callback, ProgressBar)


# ---------------------------------------------------------------- how long: epochs, steps, time


def test_max_epochs_and_max_steps() -> None:
    trainer, _ = fit({"max_epochs": 2}, val=None)
    assert (trainer.current_epoch, trainer.global_step) == (2, 16)
    trainer, model = fit({"max_steps": 5}, val=None)  # stops inside the first epoch
    assert trainer.global_step == 5 and len(model.seen["train"]) == 5
    trainer, _ = fit({"max_steps": 20, "max_epochs": 2}, val=None)  # whichever comes first
    assert trainer.global_step == 16


def test_min_epochs_and_min_steps_hold_off_should_stop() -> None:
    stop_now = LambdaCallback(on_train_batch_end=lambda t, *_: setattr(t, "should_stop", True))
    trainer, _ = fit({"max_epochs": 5, "callbacks": [stop_now]}, val=None)
    assert trainer.global_step == 1 and trainer.current_epoch == 1
    trainer, _ = fit({"max_epochs": 5, "min_epochs": 2, "callbacks": [stop_now]}, val=None)
    assert trainer.current_epoch == 2 and trainer.global_step == 16
    trainer, _ = fit({"max_epochs": 5, "min_steps": 11, "callbacks": [stop_now]}, val=None)
    assert trainer.global_step == 11


def test_max_time_stops_the_fit() -> None:
    class Slow(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            time.sleep(0.03)
            return super().training_step(batch, batch_idx)

    trainer = quiet_trainer(max_epochs=100, max_time={"seconds": 0.2})
    assert any(isinstance(c, Timer) for c in trainer.callbacks)
    started = time.monotonic()
    trainer.fit(Slow(), loader(8))
    assert time.monotonic() - started < 5 and 0 < trainer.global_step < 40


# ---------------------------------------------------------------- how much data: limits, sanity check, fast_dev_run


def test_limit_batches_take_fractions_or_counts() -> None:
    trainer, model = fit(
        {"max_epochs": 1, "limit_train_batches": 0.25, "limit_val_batches": 1, "num_sanity_val_steps": 0}
    )
    assert trainer.num_training_batches == 2 and len(model.seen["train"]) == 2
    assert trainer.num_val_batches == [1] and len(model.seen["val"]) == 1
    trainer, model = fit({"max_epochs": 1, "limit_val_batches": 0.0})
    assert model.seen["val"] == [] and model.seen["sanity"] == []
    assert len(trainer.test(model, loader(32), verbose=False)) == 1
    trainer = quiet_trainer(limit_test_batches=3, limit_predict_batches=0.5)
    trainer.test(model, loader(32), verbose=False)
    assert trainer.num_test_batches == [3]
    assert len(trainer.predict(model, loader(32))) == 4
    with pytest.raises(ConfigurationError, match=r"limit_train_batches=0.01 of a dataloader with 8 batches"):
        fit({"limit_train_batches": 0.01})


def test_num_sanity_val_steps() -> None:
    for steps, expected in ((0, 0), (1, 1), (-1, 2)):
        _, model = fit({"max_steps": 1, "num_sanity_val_steps": steps})
        assert len(model.seen["sanity"]) == expected, steps


def test_fast_dev_run_runs_one_batch_of_each_and_writes_nothing(tmp_path: Path) -> None:
    trainer, model = fit({"fast_dev_run": True, "default_root_dir": tmp_path, "logger": None}, train=64)
    assert trainer.global_step == 1 and len(model.seen["train"]) == 1 and len(model.seen["val"]) == 1
    assert model.seen["sanity"] == [] and trainer.loggers == [] and list(tmp_path.iterdir()) == []
    trainer, model = fit({"fast_dev_run": 3}, train=64, val=16)
    assert trainer.global_step == 3 and len(model.seen["val"]) == 3


# ---------------------------------------------------------------- when to validate


def test_val_check_interval_as_fraction_and_as_count() -> None:
    _, model = fit({"max_epochs": 1, "val_check_interval": 0.5, "num_sanity_val_steps": 0})
    assert sorted({v["step"] for v in model.seen["val"]}) == [4, 8]
    _, model = fit({"max_epochs": 1, "val_check_interval": 3, "num_sanity_val_steps": 0})
    assert sorted({v["step"] for v in model.seen["val"]}) == [3, 6]


def test_val_check_interval_counts_across_epochs_without_check_val_every_n_epoch() -> None:
    kwargs = {"max_epochs": 3, "val_check_interval": 5, "check_val_every_n_epoch": None, "num_sanity_val_steps": 0}
    _, model = fit(kwargs, train=16)  # 4 batches an epoch: checks after batches 5 and 10 overall
    assert sorted({v["step"] for v in model.seen["val"]}) == [5, 10]


def test_check_val_every_n_epoch() -> None:
    _, model = fit({"max_epochs": 4, "check_val_every_n_epoch": 2, "num_sanity_val_steps": 0}, train=16)
    assert sorted({v["step"] for v in model.seen["val"]}) == [8, 16]


def test_reload_dataloaders_every_n_epochs() -> None:
    class Reloading(Regressor):
        loads = 0

        def train_dataloader(self) -> Any:
            Reloading.loads += 1
            return loader(8)

    for every, expected in ((0, 1), (1, 4), (2, 2)):
        Reloading.loads = 0
        quiet_trainer(max_epochs=4, reload_dataloaders_every_n_epochs=every).fit(Reloading())
        assert Reloading.loads == expected, every


# ---------------------------------------------------------------- how to step: accumulation, clipping


def test_accumulate_grad_batches_steps_once_per_window() -> None:
    trainer, _ = fit({"max_epochs": 1, "accumulate_grad_batches": 3}, val=None)
    assert trainer.global_step == 3  # 8 batches: windows of 3, 3 and the last 2


@pytest.mark.parametrize(("algorithm", "check"), [("value", "max"), ("norm", "norm")])
def test_gradient_clip_val_and_algorithm(algorithm: str, check: str) -> None:
    largest: list[float] = []

    class Recording(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:
            result = closure() if closure is not None else None  # the closure clips after backward
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            measure = (
                max(g.abs().max() for g in grads)
                if check == "max"
                else torch.norm(torch.stack([g.norm() for g in grads]))
            )
            largest.append(float(measure))
            super().step()
            return result

    class Clipped(Regressor):
        def configure_optimizers(self) -> Any:
            return Recording(self.parameters(), lr=0.01)

    quiet_trainer(max_steps=3, gradient_clip_val=1e-3, gradient_clip_algorithm=algorithm).fit(Clipped(), loader(16))
    assert len(largest) == 3 and max(largest) <= 1e-3 * (1 + 1e-5)


# ---------------------------------------------------------------- torch switches


def test_deterministic_and_benchmark_set_torch_switches() -> None:
    before = torch.backends.cudnn.benchmark
    try:
        _, model = fit({"max_steps": 1, "deterministic": True}, val=None)
        assert model.seen["train"][0]["deterministic"] and torch.backends.cudnn.benchmark is False
        quiet_trainer(deterministic=False, benchmark=True)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark is True
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("inference_mode", [True, False])
def test_inference_mode(inference_mode: bool) -> None:
    _, model = fit({"max_steps": 1, "inference_mode": inference_mode})
    assert all(v["inference"] is inference_mode and not v["grad"] for v in model.seen["val"])


def test_detect_anomaly() -> None:
    _, model = fit({"max_steps": 1, "detect_anomaly": True}, val=None)
    assert model.seen["train"][0]["anomaly"] and not torch.is_anomaly_enabled()
    _, model = fit({"max_steps": 1}, val=None)
    assert not model.seen["train"][0]["anomaly"]


def test_barebones_trains_without_extras_and_refuses_self_log() -> None:
    trainer = quiet_trainer(
        barebones=True,
        logger=None,
        enable_checkpointing=None,
        enable_progress_bar=None,
        enable_model_summary=None,
        max_steps=2,
    )
    assert trainer.callbacks == [] and trainer.loggers == []

    class Plain(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.loss(batch)

    trainer.fit(Plain(), loader(8))
    assert trainer.global_step == 2
    with pytest.raises(ConfigurationError, match="disabled with Trainer\\(barebones=True\\)"):
        quiet_trainer(
            barebones=True, logger=None, enable_checkpointing=None, enable_progress_bar=None, enable_model_summary=None
        ).fit(Regressor(), loader(8))


# ---------------------------------------------------------------- distributed data: use_distributed_sampler, sync_batchnorm


@pytest.mark.parametrize("enabled", [True, False])
def test_use_distributed_sampler(enabled: bool) -> None:
    trainer = quiet_trainer(strategy="ddp", devices=2, use_distributed_sampler=enabled)
    source = DataSource({"train": loader(16, shuffle=True)}, None, "fit")
    source.load(trainer, "train", required=True)
    sampler = source.train_loader.sampler  # type: ignore[attr-defined]
    if enabled:
        assert isinstance(sampler, DistributedSampler) and sampler.shuffle and sampler.num_replicas == 2
        assert trainer.num_training_batches == 0 and source.counts["train"] == [2]
    else:
        assert isinstance(sampler, RandomSampler) and source.counts["train"] == [4]


def test_sync_batchnorm_converts_batch_norm_layers_on_accelerators() -> None:
    class WithNorm(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(8)

    converted = convert_sync_batchnorm(WithNorm(), torch.device("cuda", 0))
    assert isinstance(converted.norm, nn.SyncBatchNorm)
    with pytest.raises(ConfigurationError, match="sync_batchnorm=True needs accelerator devices"):
        convert_sync_batchnorm(WithNorm(), torch.device("cpu"))
    assert os.environ.get("OMP_NUM_THREADS") == "1"
