"""A small stand-in for the Trainer that drives callbacks through their hooks, and checks of the stand-in.

It has the attributes callbacks read (the contract in the Trainer's docs) and a real core strategy, so
collectives (broadcast, reduce_boolean_decision, barrier) and checkpoint writes are the real ones.
The end-to-end tests with the real Trainer are in test_callbacks_e2e.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.strategies.single_device import SingleDeviceStrategy
from torchloom.core.strategies.strategy import Strategy


class FakeTrainer:
    """Holds the trainer state callbacks read; ``call`` runs one hook on every callback."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        callbacks: Sequence[Any] = (),
        strategy: Strategy | None = None,
        loggers: Sequence[Any] = (),
        num_val_batches: Sequence[int] = (2,),
    ) -> None:
        self.strategy = strategy or SingleDeviceStrategy("cpu", accelerator=CPUAccelerator())
        self.callbacks = list(callbacks)
        self.loggers = list(loggers)
        self.module: nn.Module = nn.Linear(2, 1)
        self.default_root_dir = os.fspath(root)
        self.log_dir: str | None = None
        self.current_epoch = 0
        self.global_step = 0
        self.callback_metrics: dict[str, Tensor] = {}
        self.progress_bar_metrics: dict[str, Tensor] = {}
        self.should_stop = False
        self.sanity_checking = False
        self.state = SimpleNamespace(fn="fit", stage="train")
        self.num_training_batches: float = 4
        self.num_val_batches = list(num_val_batches)
        self.num_sanity_val_batches = [min(n, 2) for n in num_val_batches]
        self.log_every_n_steps = 1
        self.fast_dev_run = 0
        self.num_test_batches: list[int] = []
        self.num_predict_batches: list[int] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.lr_scheduler_configs: list[Any] = []
        self.saved: list[tuple[str, bool]] = []

    @property
    def is_global_zero(self) -> bool:
        return self.strategy.is_global_zero

    @property
    def logger(self) -> Any:
        return self.loggers[0] if self.loggers else None

    def call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, self.module, *args)

    def save_checkpoint(self, path: str | os.PathLike[str], weights_only: bool = False) -> None:
        state: dict[str, Any] = {
            "epoch": self.current_epoch,
            "global_step": self.global_step,
            "state_dict": self.module,
        }
        if not weights_only:
            state["callbacks"] = {cb.state_key: cb.state_dict() for cb in self.callbacks}
        self.saved.append((os.fspath(path), weights_only))
        self.strategy.save_checkpoint(path, state)

    # ------------------------------------------------------------------ a fit, hook by hook
    def fit(
        self,
        val_scores: Sequence[float | None],
        steps_per_epoch: int = 2,
        metric: str = "val_loss",
        train_metrics: dict[str, float] | None = None,
    ) -> None:
        """Runs one epoch per entry of ``val_scores`` (``None``: log nothing), stopping on ``should_stop``."""
        self.state.fn = "fit"
        self.call("setup", "fit")
        self.call("on_fit_start")
        self.call("on_train_start")
        start = self.current_epoch
        for epoch, score in enumerate(val_scores, start=start):
            self.current_epoch = epoch
            self.call("on_train_epoch_start")
            for batch_idx in range(steps_per_epoch):
                self.call("on_train_batch_start", None, batch_idx)
                self.global_step += 1
                for name, value in (train_metrics or {}).items():
                    self.callback_metrics[name] = torch.tensor(value)
                self.call("on_train_batch_end", {"loss": torch.tensor(0.5)}, None, batch_idx)
                if self.should_stop:  # like the real loop: the epoch ends after this batch
                    break
            if sum(self.num_val_batches) > 0:
                self.validate_once(score, metric)
            elif score is not None:
                self.callback_metrics[metric] = torch.tensor(score)
            self.call("on_train_epoch_end")
            if self.should_stop:
                break
        self.call("on_train_end")
        self.call("on_fit_end")
        self.call("teardown", "fit")

    def validate_once(self, score: float | None, metric: str = "val_loss") -> None:
        self.call("on_validation_start")
        self.call("on_validation_epoch_start")
        for batch_idx in range(sum(self.num_val_batches)):
            self.call("on_validation_batch_start", None, batch_idx, 0)
            self.call("on_validation_batch_end", None, None, batch_idx, 0)
        if score is not None:
            self.callback_metrics[metric] = torch.tensor(score)
        self.call("on_validation_epoch_end")
        self.call("on_validation_end")


def ckpt_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.suffix == ".ckpt"} if folder.is_dir() else set()


class _Recorder:
    state_key = "recorder"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        return {"calls": len(self.calls)}

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("on_") and name not in ("setup", "teardown"):
            raise AttributeError(name)
        return lambda *args: self.calls.append(name)


def test_fake_fit_runs_hooks_in_order_and_stops_on_should_stop(tmp_path: Path) -> None:
    recorder = _Recorder()
    trainer = FakeTrainer(tmp_path, [recorder], num_val_batches=[1])
    trainer.fit([1.0, 2.0], steps_per_epoch=1)
    assert trainer.global_step == 2 and trainer.current_epoch == 1
    assert recorder.calls[:4] == ["setup", "on_fit_start", "on_train_start", "on_train_epoch_start"]
    assert recorder.calls.count("on_validation_end") == 2 and recorder.calls[-1] == "teardown"
    trainer.should_stop = True
    recorder.calls.clear()
    trainer.fit([1.0, 2.0], steps_per_epoch=1)
    assert recorder.calls.count("on_train_epoch_end") == 1


def test_fake_save_checkpoint_writes_a_weights_only_loadable_file_with_callback_states(tmp_path: Path) -> None:
    trainer = FakeTrainer(tmp_path, [_Recorder()])
    trainer.global_step = 7
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    loaded = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert loaded["global_step"] == 7 and loaded["callbacks"] == {"recorder": {"calls": 0}}
    assert set(loaded["state_dict"]) == {"weight", "bias"}
    trainer.save_checkpoint(tmp_path / "b.ckpt", weights_only=True)
    assert "callbacks" not in torch.load(tmp_path / "b.ckpt", weights_only=True)
