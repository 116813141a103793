"""Checkpoints: their contents, weights_only loading, exact resume (end of epoch and mid-epoch), loading modules."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from torchloom.core.errors import ConfigurationError
from torchloom.trainer.callbacks import Callback, ModelCheckpoint
from torchloom.trainer.checkpoint import load_module_from_checkpoint

from .engine_models import Regressor, assert_same_weights, loader, quiet_trainer, weights

EPOCHS = 4


class Counting(Callback):
    """A callback with state, to see it saved and restored."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches = state_dict["batches"]


def run(
    max_epochs: int, ckpt_path: Any = None, callbacks: list[Any] | None = None, **kwargs: Any
) -> tuple[Any, Regressor]:
    """A run with everything that could break exactness: shuffling, dropout, momentum, an epoch scheduler,
    validation and a sanity check (both draw from the random state too)."""
    torch.manual_seed(0)
    model = Regressor(dropout=0.3, scheduler="step")
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=callbacks, num_sanity_val_steps=1, **kwargs)
    trainer.fit(
        model, loader(36, batch_size=4, shuffle=True), loader(8, batch_size=4, shuffle=True), ckpt_path=ckpt_path
    )
    return trainer, model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], Path]:
    """Four epochs in one go, writing a checkpoint every 4 optimizer steps (9 batches per epoch: mid-epoch ones)."""
    folder = tmp_path_factory.mktemp("every_4_steps")
    saver = ModelCheckpoint(dirpath=folder, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    _, model = run(EPOCHS, callbacks=[saver], enable_checkpointing=True)
    return weights(model), folder


def test_resuming_after_two_epochs_gives_the_weights_of_an_uninterrupted_run(
    uninterrupted: tuple[dict[str, torch.Tensor], Path], tmp_path: Path
) -> None:
    first, _ = run(2)
    first.save_checkpoint(tmp_path / "after_2.ckpt")
    resumed, model = run(EPOCHS, ckpt_path=tmp_path / "after_2.ckpt")
    assert resumed.current_epoch == EPOCHS and resumed.global_step == 36
    assert_same_weights(weights(model), uninterrupted[0])


@pytest.mark.parametrize("step", [4, 16, 20])  # inside epoch 0, inside epoch 1, inside epoch 2
def test_resuming_from_a_mid_epoch_checkpoint_gives_the_same_weights(
    uninterrupted: tuple[dict[str, torch.Tensor], Path], step: int
) -> None:
    path = uninterrupted[1] / f"step={step}.ckpt"
    saved = torch.load(path, weights_only=True)
    assert saved["loops"]["fit"]["batches_done"] == step % 9 and not saved["loops"]["fit"]["epoch_finished"]
    resumed, model = run(EPOCHS, ckpt_path=path)
    assert resumed.global_step == 36
    assert_same_weights(weights(model), uninterrupted[0])


def test_resuming_from_a_checkpoint_saved_at_the_end_of_an_epoch(
    uninterrupted: tuple[dict[str, torch.Tensor], Path], tmp_path: Path
) -> None:
    """ModelCheckpoint(save_last) saves at validation end, inside the epoch's last batch."""
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    run(2, callbacks=[saver], enable_checkpointing=True)
    last = tmp_path / "last.ckpt"
    assert torch.load(last, weights_only=True)["loops"]["fit"]["batches_done"] == 9
    _, model = run(EPOCHS, ckpt_path=last)
    assert_same_weights(weights(model), uninterrupted[0])


def test_a_checkpoint_holds_the_documented_keys_and_loads_with_weights_only(tmp_path: Path) -> None:
    counting = Counting()
    trainer, model = run(1, callbacks=[counting])
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    full = torch.load(tmp_path / "full.ckpt", weights_only=True)
    assert set(full) == {
        "torchloom_version", "epoch", "global_step", "state_dict", "optimizer_states", "lr_schedulers",
        "precision", "loops", "callbacks", "datamodule", "hyper_parameters", "rng",
    }  # fmt: skip
    assert full["epoch"] == 1 and full["global_step"] == 9
    assert full["hyper_parameters"] == {"lr": 0.05, "dropout": 0.3, "scheduler": "step"}
    assert full["callbacks"]["Counting"] == {"batches": 9}
    assert set(full["rng"]) >= {"python", "numpy", "torch"}
    only_weights = torch.load(tmp_path / "weights.ckpt", weights_only=True)
    assert set(only_weights) == {"torchloom_version", "epoch", "global_step", "state_dict", "hyper_parameters", "loops"}
    assert_same_weights(only_weights["state_dict"], weights(model))

    restored = Counting()
    quiet_trainer(max_epochs=2, callbacks=[restored]).fit(
        Regressor(dropout=0.3, scheduler="step"), loader(36), ckpt_path=tmp_path / "full.ckpt"
    )
    assert restored.batches == 9 + 9
    with pytest.raises(ConfigurationError, match=r"no \['optimizer_states', 'lr_schedulers'\].*weights_only=True"):
        quiet_trainer(max_epochs=2).fit(Regressor(scheduler="step"), loader(36), ckpt_path=tmp_path / "weights.ckpt")


def test_a_hyperparameter_that_needs_pickling_is_refused_at_save_time(tmp_path: Path) -> None:
    class WithPath(Regressor):
        def __init__(self, folder: Path) -> None:
            super().__init__()

    with pytest.warns(UserWarning, match="cannot be loaded with weights_only=True"):
        model = WithPath(tmp_path)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, loader(8))
    with pytest.raises(ConfigurationError, match="hyper-parameter 'folder' cannot be stored in a checkpoint"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def test_other_state_that_needs_pickling_is_refused_at_save_time(tmp_path: Path) -> None:
    class PathState(Callback):
        def state_dict(self) -> dict[str, Any]:
            return {"where": tmp_path}

    trainer = quiet_trainer(max_epochs=1, callbacks=[PathState()])
    trainer.fit(Regressor(), loader(8))
    with pytest.raises(ConfigurationError, match=r"checkpoint\['callbacks'\]\['.*PathState'\].*needs pickling"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")


def test_load_from_checkpoint_rebuilds_the_module_with_overrides(tmp_path: Path) -> None:
    trainer, model = run(1)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = Regressor.load_from_checkpoint(tmp_path / "model.ckpt")
    assert isinstance(loaded, Regressor) and loaded.hparams.dropout == 0.3
    assert_same_weights(weights(loaded), weights(model))
    changed = load_module_from_checkpoint(Regressor, tmp_path / "model.ckpt", lr=0.5)
    assert changed.lr == 0.5 and changed.hparams.scheduler == "step"


@pytest.mark.filterwarnings("ignore:The checkpoint folder")
def test_ckpt_path_last_and_best(tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_last=True, save_top_k=1)
    trainer, _ = run(2, callbacks=[saver], enable_checkpointing=True)
    assert saver.best_model_path and os.path.isfile(saver.best_model_path)
    (tested,) = trainer.test(ckpt_path="best", dataloaders=loader(8), verbose=False)
    assert "test_loss" in tested
    resumed, _ = run(
        3, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)], ckpt_path="last", enable_checkpointing=True
    )
    assert resumed.global_step == 27  # 2 epochs restored + 1 trained
    with pytest.warns(UserWarning, match="ckpt_path='last' found no checkpoint"):
        fresh, _ = run(
            1, ckpt_path="last", callbacks=[ModelCheckpoint(dirpath=tmp_path / "empty")], enable_checkpointing=True
        )
    assert fresh.global_step == 9
    with pytest.raises(ConfigurationError, match="ckpt_path='best' needs a ModelCheckpoint"):
        quiet_trainer().test(Regressor(), loader(8), ckpt_path="best")


def test_the_cuda_random_state_is_captured_once_cuda_is_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchloom.trainer import rng

    states = [torch.tensor([1, 2], dtype=torch.uint8)]
    restored: list[Any] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    captured = rng.capture_rng()
    assert captured["cuda"] is states
    rng.restore_rng(captured)
    assert restored == [states]


@pytest.mark.cuda
def test_a_gpu_fit_with_a_grad_scaler_resumes_and_leaves_the_module_on_the_cpu(tmp_path: Path) -> None:
    def gpu_run(max_epochs: int, ckpt_path: Any = None) -> tuple[Any, Regressor]:
        torch.manual_seed(0)
        model = Regressor(scheduler="step")
        trainer = quiet_trainer(accelerator="cuda", precision="16-mixed", max_epochs=max_epochs, deterministic=True)
        trainer.fit(model, loader(36, shuffle=True), ckpt_path=ckpt_path)
        return trainer, model

    try:
        _, whole = gpu_run(4)
        first, _ = gpu_run(2)
        first.save_checkpoint(tmp_path / "gpu.ckpt")
        assert "scaler" in torch.load(tmp_path / "gpu.ckpt", weights_only=True)["precision"]
        resumed, model = gpu_run(4, tmp_path / "gpu.ckpt")
    finally:
        torch.use_deterministic_algorithms(False)
    assert next(model.parameters()).device.type == "cpu" and resumed.global_step == 36
    assert_same_weights(weights(model), weights(whole))
