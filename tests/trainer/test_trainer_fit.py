"""fit / validate / test / predict on one process: parity with a plain loop, optimization forms, clear errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from torchloom.core.errors import ConfigurationError
from torchloom.trainer import LoomDataModule, LoomModule
from torchloom.trainer.callbacks import EarlyStopping, LambdaCallback, ModelCheckpoint

from .engine_models import Regressor, assert_same_weights, loader, quiet_trainer, weights


def plain_loop(model: Regressor, epochs: int, accumulate: int, clip: float | None, algorithm: str, seed: int) -> None:
    """What the Trainer should do, written by hand."""
    optimizer = torch.optim.SGD(model.parameters(), lr=model.lr, momentum=0.9)
    torch.manual_seed(seed)
    data = loader(40, batch_size=4, shuffle=True)
    for _ in range(epochs):
        batches = len(data)
        for index, batch in enumerate(data):
            loss = model.loss(batch)
            (loss / accumulate if accumulate > 1 else loss).backward()  # type: ignore[no-untyped-call]
            if (index + 1) % accumulate == 0 or index + 1 == batches:
                if clip is not None and algorithm == "norm":
                    params = [p for p in model.parameters() if p.grad is not None]
                    torch.nn.utils.clip_grad_norm_(params, clip)
                elif clip is not None:
                    torch.nn.utils.clip_grad_value_(model.parameters(), clip)
                optimizer.step()
                optimizer.zero_grad()


@pytest.mark.parametrize(
    ("accumulate", "clip", "algorithm"), [(1, None, "norm"), (3, 0.05, "norm"), (2, 0.01, "value")]
)
def test_fit_gives_the_weights_of_a_plain_loop(accumulate: int, clip: float | None, algorithm: str) -> None:
    torch.manual_seed(1)
    model = Regressor(dropout=0.25)
    reference = copy.deepcopy(model)
    torch.manual_seed(7)
    trainer = quiet_trainer(
        max_epochs=3, accumulate_grad_batches=accumulate, gradient_clip_val=clip, gradient_clip_algorithm=algorithm
    )
    trainer.fit(model, loader(40, batch_size=4, shuffle=True))
    plain_loop(reference, epochs=3, accumulate=accumulate, clip=clip, algorithm=algorithm, seed=7)
    assert_same_weights(weights(model), weights(reference))
    assert trainer.global_step == 3 * -(-10 // accumulate) and trainer.current_epoch == 3


def test_training_step_may_return_a_dict_or_none() -> None:
    class Skipping(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return None if batch_idx % 2 else {"loss": self.loss(batch), "extra": 1}

    seen: list[Any] = []
    model = Skipping()
    before = weights(model)
    callback = LambdaCallback(on_train_batch_end=lambda t, m, outputs, b, i: seen.append(outputs))
    quiet_trainer(max_epochs=1, callbacks=[callback]).fit(model, loader(16))
    assert seen[0]["extra"] == 1 and not seen[0]["loss"].requires_grad and seen[1] is None
    assert not torch.equal(before["head.weight"], model.head.weight)


def test_on_train_batch_start_returning_minus_one_ends_the_epoch() -> None:
    class Short(Regressor):
        def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
            return -1 if batch_idx == 2 else None

    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(Short(), loader(32))
    assert trainer.global_step == 4 and trainer.current_epoch == 2


def test_schedulers_step_by_interval_and_frequency() -> None:
    lrs: list[float] = []

    class Scheduled(Regressor):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
            step = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": step, "interval": "step", "frequency": 2}}

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    quiet_trainer(max_epochs=1).fit(Scheduled(lr=1.0), loader(24))
    assert lrs == [1.0, 0.5, 0.5, 0.25, 0.25, 0.125]

    epoch_model = Regressor(lr=1.0, scheduler="step")
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(epoch_model, loader(8))
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.125


def test_plateau_scheduler_reads_the_monitored_metric_and_a_missing_one_is_an_error() -> None:
    trainer = quiet_trainer(max_epochs=3, num_sanity_val_steps=0)
    model = Regressor(lr=0.0, scheduler="plateau")  # lr 0: val_loss never improves, so every epoch halves
    trainer.fit(model, loader(8), loader(8))
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0

    class Plateau(Regressor):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "never_logged"}}

    with pytest.raises(ConfigurationError, match=r"monitors 'never_logged', which was not logged.*'train_loss'"):
        quiet_trainer(max_epochs=1).fit(Plateau(), loader(8))


@pytest.mark.parametrize(
    "callback",
    [EarlyStopping(monitor="never_logged"), ModelCheckpoint(monitor="never_logged")],
    ids=["early_stopping", "checkpoint"],
)
def test_a_monitor_key_that_is_never_logged_is_an_error(callback: Any, tmp_path: Path) -> None:
    if isinstance(callback, ModelCheckpoint):
        callback.dirpath = str(tmp_path)
    trainer = quiet_trainer(max_epochs=2, callbacks=[callback], enable_checkpointing=True)
    with pytest.raises(ConfigurationError, match="never_logged"):
        trainer.fit(Regressor(), loader(8), loader(8))


def test_no_training_step_is_an_error_before_anything_runs() -> None:
    calls: list[str] = []

    class NoStep(Regressor):
        training_step = LoomModule.training_step  # the base's: not overridden

        def setup(self, stage: str) -> None:
            calls.append("setup")

    with pytest.raises(ConfigurationError, match="NoStep defines no training_step"):
        quiet_trainer(max_epochs=1).fit(NoStep(), loader(8))
    assert calls == []


@pytest.mark.parametrize(
    ("returned", "pattern"),
    [
        ("adam", "configure_optimizers\\(\\) returned 'adam', which is not usable"),
        (None, "returned None"),
        ({"lr_scheduler": None}, "has no 'optimizer'"),
        ([nn.Linear(1, 1)], "where an optimizer belongs"),
    ],
)
def test_configure_optimizers_returning_something_unusable_is_an_error(returned: Any, pattern: str) -> None:
    class Bad(Regressor):
        def configure_optimizers(self) -> Any:
            return returned

    with pytest.raises(ConfigurationError, match=pattern):
        quiet_trainer(max_epochs=1).fit(Bad(), loader(8))


def test_several_optimizers_need_manual_optimization() -> None:
    class Two(Regressor):
        def configure_optimizers(self) -> Any:
            return [torch.optim.SGD(self.layer.parameters(), lr=0.1), torch.optim.SGD(self.head.parameters(), lr=0.1)]

    with pytest.raises(ConfigurationError, match="returned 2 optimizers; automatic optimization steps one"):
        quiet_trainer(max_epochs=1).fit(Two(), loader(8))


def test_val_check_interval_larger_than_the_epoch_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match="val_check_interval=9 is larger than the 2 training batches"):
        quiet_trainer(max_epochs=1, val_check_interval=9).fit(Regressor(), loader(8), loader(8))


def test_ckpt_path_that_does_not_exist_is_an_error_before_anything_runs(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(ConfigurationError, match=r"ckpt_path='.*nope.ckpt' does not exist\. Valid: .*'last'"):
        quiet_trainer(max_epochs=1).fit(Regressor(), loader(8), ckpt_path=missing)
    with pytest.raises(ConfigurationError, match="does not exist"):
        quiet_trainer().test(Regressor(), loader(8), ckpt_path=missing)


def test_fit_without_training_data_names_the_three_sources() -> None:
    with pytest.raises(ConfigurationError, match=r"fit\(\) has no training data.*train_dataloaders=.*datamodule"):
        quiet_trainer(max_epochs=1).fit(Regressor())
    with pytest.raises(ConfigurationError, match="either train_dataloaders or datamodule"):
        quiet_trainer().fit(Regressor(), loader(), datamodule=LoomDataModule())
    with pytest.raises(ConfigurationError, match="needs a LoomModule"):
        quiet_trainer().fit(nn.Linear(1, 1), loader())  # type: ignore[arg-type]


def test_manual_optimization_steps_each_optimizer_and_counts_every_step() -> None:
    class Manual(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.hooks: list[str] = []

        def training_step(self, batch: Any, batch_idx: int) -> None:  # type: ignore[override]
            first, second = self.optimizers()
            for optimizer in (first, second):
                self.toggle_optimizer(optimizer)
                optimizer.zero_grad()
                self.manual_backward(self.loss(batch))
                optimizer.step()
                self.untoggle_optimizer(optimizer)

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            self.hooks.append("before_step")

        def configure_optimizers(self) -> Any:
            return [torch.optim.SGD(self.layer.parameters(), lr=0.1), torch.optim.SGD(self.head.parameters(), lr=0.1)]

    torch.manual_seed(0)
    model = Manual()
    reference = copy.deepcopy(model)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, loader(12))
    assert trainer.global_step == 6 and model.hooks == ["before_step"] * 6
    optimizers = [
        torch.optim.SGD(reference.layer.parameters(), lr=0.1),
        torch.optim.SGD(reference.head.parameters(), lr=0.1),
    ]
    for batch in loader(12):
        for optimizer, owned in zip(optimizers, (reference.layer, reference.head)):
            others = [p for p in reference.parameters() if all(p is not q for q in owned.parameters())]
            for p in others:
                p.requires_grad_(False)
            optimizer.zero_grad()
            reference.loss(batch).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            for p in others:
                p.requires_grad_(True)
    assert_same_weights(weights(model), weights(reference))
    with pytest.raises(ConfigurationError, match=r"gradient_clip_val=1.0 clips in automatic optimization only"):
        quiet_trainer(max_epochs=1, gradient_clip_val=1.0).fit(Manual(), loader(8))


def test_validate_test_and_predict_return_their_results() -> None:
    model = Regressor()
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, loader(16))
    (validated,) = trainer.validate(model, loader(8), verbose=False)
    (tested,) = trainer.test(dataloaders=loader(8), verbose=False)  # the fitted model
    assert validated["val_loss"] == pytest.approx(tested["test_loss"])
    predictions = trainer.predict(model, loader(8, batch_size=4))
    assert len(predictions) == 2 and predictions[0].shape == (4, 1)
    several = trainer.predict(model, [loader(8, batch_size=4), loader(4, batch_size=4)])
    assert [len(p) for p in several] == [2, 1]


def test_several_evaluation_dataloaders_get_their_own_results() -> None:
    class TwoLoaders(Regressor):
        def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            self.log("test_loss", self.loss(batch))

    results = quiet_trainer().test(TwoLoaders(), [loader(8, seed=1), loader(8, seed=2)], verbose=False)
    assert len(results) == 2
    assert set(results[0]) == {"test_loss/dataloader_idx_0"} and set(results[1]) == {"test_loss/dataloader_idx_1"}
    assert results[0]["test_loss/dataloader_idx_0"] != results[1]["test_loss/dataloader_idx_1"]


class CountingData(LoomDataModule):
    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = root
        self.calls: list[str] = []
        self.epochs_seen = 0

    def prepare_data(self) -> None:
        self.calls.append("prepare_data")

    def setup(self, stage: str) -> None:
        self.calls.append(f"setup:{stage}")

    def teardown(self, stage: str) -> None:
        self.calls.append(f"teardown:{stage}")

    def train_dataloader(self) -> Any:
        return loader(8)

    def val_dataloader(self) -> Any:
        return loader(4)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs_seen = state_dict["epochs_seen"]


def test_a_datamodule_supplies_data_and_its_state_travels_in_checkpoints(tmp_path: Path) -> None:
    data = CountingData(str(tmp_path))
    data.epochs_seen = 5
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(Regressor(), datamodule=data)
    assert data.calls == ["prepare_data", "setup:fit", "teardown:fit"]
    assert trainer.datamodule is data and trainer.num_training_batches == 2 and trainer.num_val_batches == [1]
    trainer.save_checkpoint(tmp_path / "dm.ckpt")
    assert torch.load(tmp_path / "dm.ckpt", weights_only=True)["datamodule"] == {"epochs_seen": 5}
    fresh = CountingData(str(tmp_path))
    quiet_trainer(max_epochs=2).fit(Regressor(), datamodule=fresh, ckpt_path=tmp_path / "dm.ckpt")
    assert fresh.epochs_seen == 5
    with pytest.raises(ConfigurationError, match="test\\(\\) has no test data"):
        quiet_trainer().test(Regressor(), datamodule=CountingData(str(tmp_path)), verbose=False)


@pytest.mark.parametrize(("kwargs", "expected"), [({"max_epochs": 2}, 8), ({"max_epochs": 2, "max_steps": 5}, 5)])
def test_estimated_stepping_batches_is_known_in_configure_optimizers(kwargs: dict[str, Any], expected: int) -> None:
    seen: list[float] = []

    class OneCycle(Regressor):
        def configure_optimizers(self) -> Any:
            seen.append(self.trainer.estimated_stepping_batches)
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            total = int(self.trainer.estimated_stepping_batches)
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=total)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    trainer = quiet_trainer(accumulate_grad_batches=3, **kwargs)
    trainer.fit(OneCycle(), loader(40))  # 10 batches: 4 steps an epoch
    assert seen == [expected] and trainer.global_step == expected


def test_the_trainer_reports_what_it_is_doing() -> None:
    states: list[tuple[str | None, str | None, bool, bool, bool]] = []

    def record(trainer: Any, *_: Any) -> None:
        states.append(
            (trainer.state.fn, trainer.state.stage, trainer.sanity_checking, trainer.training, trainer.validating)
        )

    callback = LambdaCallback(on_validation_start=record, on_train_epoch_start=record, on_test_start=record)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback])
    model = Regressor()
    trainer.fit(model, loader(8), loader(4))
    trainer.test(model, loader(4), verbose=False)
    assert states == [
        ("fit", "sanity_check", True, False, False),
        ("fit", "train", False, True, False),
        ("fit", "validate", False, False, True),
        ("test", "test", False, False, False),
    ]
    assert trainer.state.stage is None and trainer.model is model and trainer.loom_module is model
    assert trainer.lr_scheduler_configs == [] and len(trainer.optimizers) == 1 and trainer.is_global_zero
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (0, 0, 0, 1)
    assert (trainer.max_epochs, trainer.min_epochs, trainer.max_steps, trainer.min_steps) == (1, 0, -1, 0)
