"""What the Trainer does for sharded strategies, checked in one process (the 2-rank runs are in
test_sharded_fsdp.py and test_sharded_model_parallel.py).

The Trainer reads capabilities of the strategy, never its class: ``initializes_empty_modules`` (build
``configure_model``'s layers empty), ``supports_inference_mode``, ``device_mesh``. Sharded checkpoint
folders are written here with core's ``save_sharded`` without a process group, as a 1-rank run would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from typing_extensions import override

from torchloom.core.checkpoint import distributed as sharded_io
from torchloom.core.errors import ConfigurationError
from torchloom.core.strategies.fsdp import FSDPStrategy
from torchloom.core.strategies.single_device import SingleDeviceStrategy
from torchloom.trainer import LoomModule, Trainer
from torchloom.trainer.callbacks import Callback, ModelCheckpoint

from .engine_models import loader, quiet_trainer, weights


class LateModel(LoomModule):
    """Builds its layers in ``configure_model`` and records what it saw there."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layers: nn.Sequential | None = None
        self.seen: dict[str, Any] = {}

    def configure_model(self) -> None:
        self.seen["mesh"] = self.device_mesh
        if self.layers is None:
            self.layers = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x: Tensor) -> Tensor:
        assert self.layers is not None
        output: Tensor = self.layers(x)
        return output

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.seen["inference_mode"] = torch.is_inference_mode_enabled()
        self.seen["grad_enabled"] = torch.is_grad_enabled()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        norm = self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.seen.setdefault("norms", []).append((norm, expected))


class MeshStrategy(SingleDeviceStrategy):
    """A one-device strategy that declares the sharded capabilities, recording how it is asked."""

    initializes_empty_modules = True
    supports_inference_mode = False

    def __init__(self) -> None:
        super().__init__("cpu")
        self.device_mesh = object()  # what LoomModule.device_mesh must hand over as it is
        self.empty_init: list[bool | None] = []

    @override
    @contextlib.contextmanager
    def module_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        self.empty_init.append(empty_init)
        with super().module_init_context(empty_init):
            yield


def test_device_mesh_is_the_strategy_mesh_or_none() -> None:
    model = LateModel()
    assert model.device_mesh is None  # not attached to a trainer
    quiet_trainer(max_epochs=1).fit(model, loader(8))
    assert model.seen["mesh"] is None  # single device: no mesh
    strategy = MeshStrategy()
    quiet_trainer(strategy=strategy, max_epochs=1).fit(LateModel(), loader(8))
    assert strategy.empty_init == [True]  # configure_model ran under module_init_context(empty_init=True)


def test_configure_model_layers_are_built_normally_without_the_capability() -> None:
    strategy = MeshStrategy()
    strategy.initializes_empty_modules = False
    quiet_trainer(strategy=strategy, max_epochs=1).fit(LateModel(), loader(8))
    assert strategy.empty_init == [False]


def test_evaluation_uses_no_grad_when_the_strategy_cannot_use_inference_mode() -> None:
    model = LateModel()
    quiet_trainer(max_epochs=1).validate(model, loader(8), verbose=False)
    assert model.seen["inference_mode"] is True
    strategy = MeshStrategy()
    quiet_trainer(strategy=strategy).validate(model, loader(8), verbose=False)
    assert model.seen["inference_mode"] is False and model.seen["grad_enabled"] is False


def test_clip_gradients_returns_the_total_norm_before_clipping() -> None:
    model = LateModel()
    quiet_trainer(max_epochs=1, gradient_clip_val=0.01).fit(model, loader(8))
    assert len(model.seen["norms"]) == 2
    for norm, expected in model.seen["norms"]:
        assert isinstance(norm, Tensor) and torch.allclose(norm, expected)
        assert norm > 0.01  # so clipping scaled the gradients down


def test_fsdp_by_name_resolves_with_the_sharded_capabilities() -> None:
    trainer = Trainer(strategy="fsdp", accelerator="cpu", devices=2, logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, FSDPStrategy) and strategy.num_processes == 2
    assert strategy.initializes_empty_modules and strategy.restore_checkpoint_after_setup
    assert not strategy.supports_inference_mode and strategy.state_dict_type == "sharded"


# ---------------------------------------------------------------------- sharded checkpoint folders
def write_sharded(checkpoint: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """``checkpoint`` as a sharded strategy writes it: a folder, optimizer states keyed by parameter name."""
    names = sharded_io.parameter_names(model, optimizer)
    named = dict(checkpoint)
    named["optimizer_states"] = [sharded_io.optimizer_state_to_named(s, names) for s in checkpoint["optimizer_states"]]
    sharded_io.save_sharded(path, named, sharded_io.kinds_of(named), SingleDeviceStrategy("cpu"))
    assert sharded_io.is_sharded_checkpoint(path)


class StartStep(Callback):
    step = -1

    def on_train_start(self, trainer: Any, module: Any) -> None:
        self.step = trainer.global_step


@pytest.fixture
def one_epoch(tmp_path: Path) -> tuple[Path, Path]:
    """A one-epoch run's checkpoint as a file and as a sharded folder named ``last.ckpt``."""
    torch.manual_seed(0)
    model = LateModel()
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, loader(16, batch_size=4))
    file = tmp_path / "one_epoch.ckpt"
    trainer.save_checkpoint(file)
    checkpoint = torch.load(file, weights_only=True)
    folder = tmp_path / "sharded" / "last.ckpt"
    write_sharded(checkpoint, model, trainer.optimizers[0], folder)
    return file, folder


def test_a_sharded_folder_resumes_on_one_device_like_the_file(one_epoch: tuple[Path, Path]) -> None:
    file, folder = one_epoch
    resumed = {}
    for name, path in (("file", str(file)), ("folder", "last")):  # "last" finds the folder
        model = LateModel()
        finder = ModelCheckpoint(dirpath=folder.parent, save_top_k=0)
        start = StartStep()
        trainer = quiet_trainer(max_epochs=3, callbacks=[finder, start], enable_checkpointing=True)
        trainer.fit(model, loader(16, batch_size=4), ckpt_path=path)
        assert start.step == 4 and trainer.global_step == 12  # resumed after the saved epoch
        resumed[name] = weights(model)
    for key, value in resumed["file"].items():
        assert torch.equal(resumed["folder"][key], value), key


def test_load_from_checkpoint_reads_a_folder_and_builds_configure_model_layers(one_epoch: tuple[Path, Path]) -> None:
    file, folder = one_epoch
    from_file = LateModel.load_from_checkpoint(file)
    from_folder = LateModel.load_from_checkpoint(folder, lr=0.5)
    assert from_folder.hparams["lr"] == 0.5 and from_file.hparams["lr"] == 0.05
    expected = torch.load(file, weights_only=True)["state_dict"]
    for model in (from_file, from_folder):
        assert model.state_dict().keys() == expected.keys()
        assert all(torch.equal(model.state_dict()[key], value) for key, value in expected.items())


def test_a_weights_only_folder_cannot_resume_training(tmp_path: Path) -> None:
    model = LateModel()
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, loader(8))
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    checkpoint = torch.load(tmp_path / "weights.ckpt", weights_only=True)
    sharded_io.save_sharded(
        tmp_path / "folder", checkpoint, sharded_io.kinds_of(checkpoint), SingleDeviceStrategy("cpu")
    )
    with pytest.raises(ConfigurationError, match="cannot resume"):
        quiet_trainer(max_epochs=2).fit(LateModel(), loader(8), ckpt_path=tmp_path / "folder")
