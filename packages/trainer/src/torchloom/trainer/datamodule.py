"""``LoomDataModule``: the data side of a job (download, split, dataloaders) kept apart from the model.

The Trainer calls ``prepare_data`` once per node (local rank 0; the other ranks wait), then
``setup(stage)`` in every process, then the ``*_dataloader`` method the stage needs, and
``teardown(stage)`` at the end. ``state_dict`` is saved in checkpoints under ``"datamodule"``.

Like the module, the base defines no ``train_dataloader`` / ``val_dataloader`` / ``test_dataloader`` /
``predict_dataloader``: the Trainer looks for them (``getattr(dm, "val_dataloader", None)``), so a
data module without validation data simply defines no ``val_dataloader``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torchloom.core.errors import ConfigurationError
from torchloom.trainer.hparams import HyperparametersMixin

if TYPE_CHECKING:
    from torchloom.trainer.trainer import Trainer

__all__ = ["LoomDataModule"]


class LoomDataModule(HyperparametersMixin):
    """Base of data modules: override ``setup`` and the ``*_dataloader`` methods your stages use."""

    _trainer: Trainer | None = None

    @property
    def trainer(self) -> Trainer:
        """The Trainer running this data module (set while fit/validate/test/predict run)."""
        if self._trainer is None:
            raise ConfigurationError(
                f"{type(self).__name__} is not attached to a Trainer; pass it as trainer.fit(model, datamodule=dm)."
            )
        return self._trainer

    def _attach(self, trainer: Trainer) -> None:
        self._trainer = trainer

    def _detach(self) -> None:
        self._trainer = None

    def prepare_data(self) -> None:
        """Downloads or writes data to disk; runs once per node. Do not set state here: other ranks skip it."""

    def setup(self, stage: str) -> None:
        """Builds datasets for ``stage`` ("fit", "validate", "test" or "predict"); runs in every process."""

    def teardown(self, stage: str) -> None:
        """Cleans up after ``stage``."""

    def state_dict(self) -> dict[str, Any]:
        """State to save in checkpoints (plain values only: checkpoints load with weights_only=True)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores what ``state_dict`` returned."""

    def __getstate__(self) -> dict[str, Any]:
        # the trainer does not travel with the data module (ddp_spawn pickles it to the workers)
        state = self.__dict__.copy()
        state.pop("_trainer", None)
        return state
