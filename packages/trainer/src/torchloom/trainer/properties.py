"""The Trainer's read-only view for users and callbacks: counters, metrics, ranks, callbacks, data sizes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch import Tensor
from torch.optim import Optimizer

from torchloom.core.accelerators.accelerator import Accelerator
from torchloom.core.errors import ConfigurationError
from torchloom.core.loggers.logger import Logger
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies.strategy import Strategy
from torchloom.trainer.callbacks.callback import Callback
from torchloom.trainer.callbacks.checkpoint import ModelCheckpoint
from torchloom.trainer.callbacks.early_stopping import EarlyStopping
from torchloom.trainer.callbacks.progress import ProgressBar

if TYPE_CHECKING:
    from torchloom.core.connector import Setup
    from torchloom.trainer.adapter import StrategyAdapter
    from torchloom.trainer.config import TrainerConfig
    from torchloom.trainer.data_source import DataSource
    from torchloom.trainer.datamodule import LoomDataModule
    from torchloom.trainer.logging import MetricStore
    from torchloom.trainer.module import LoomModule
    from torchloom.trainer.optimizers import SchedulerConfig
    from torchloom.trainer.state import FitProgress, TrainerState

__all__ = ["TrainerProperties"]


class TrainerProperties:
    """Mixed into ``Trainer``; every value here is read from the trainer's state, never stored twice."""

    _config: TrainerConfig
    _setup: Setup
    _adapter: StrategyAdapter
    _metrics: MetricStore
    _progress: FitProgress
    _data: DataSource | None
    _module: LoomModule | None
    _datamodule: LoomDataModule | None
    _optimizers: list[Optimizer]
    _scheduler_configs: list[SchedulerConfig]
    _loggers: list[Logger]
    _callbacks: list[Callback]
    _log_dir: str | None
    state: TrainerState

    # ------------------------------------------------------------------ progress
    @property
    def current_epoch(self) -> int:
        return self._progress.epoch

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far."""
        return self._progress.global_step

    @property
    def max_epochs(self) -> int:
        return self._config.max_epochs

    @property
    def min_epochs(self) -> int:
        return self._config.min_epochs

    @property
    def max_steps(self) -> int:
        return self._config.max_steps

    @property
    def min_steps(self) -> int:
        return self._config.min_steps

    @property
    def accumulate_grad_batches(self) -> int:
        return self._config.accumulate_grad_batches

    @property
    def fast_dev_run(self) -> int:
        return self._config.fast_dev_run

    @property
    def log_every_n_steps(self) -> int:
        return self._config.log_every_n_steps

    @property
    def check_val_every_n_epoch(self) -> int | None:
        return self._config.check_val_every_n_epoch

    @property
    def val_check_interval(self) -> int | float:
        return self._config.val_check_interval

    @property
    def gradient_clip_val(self) -> float | None:
        return self._config.gradient_clip_val

    @property
    def gradient_clip_algorithm(self) -> str:
        return self._config.gradient_clip_algorithm

    @property
    def enable_progress_bar(self) -> bool:
        return self._config.enable_progress_bar

    @property
    def default_root_dir(self) -> str:
        return self._config.default_root_dir

    # ------------------------------------------------------------------ what is running
    @property
    def sanity_checking(self) -> bool:
        return self.state.stage == "sanity_check"

    @property
    def training(self) -> bool:
        return self.state.stage == "train"

    @property
    def validating(self) -> bool:
        return self.state.stage == "validate"

    @property
    def testing(self) -> bool:
        return self.state.stage == "test"

    @property
    def predicting(self) -> bool:
        return self.state.stage == "predict"

    # ------------------------------------------------------------------ metrics
    @property
    def callback_metrics(self) -> dict[str, Tensor]:
        return self._metrics.callback_metrics

    @property
    def logged_metrics(self) -> dict[str, Tensor]:
        return self._metrics.logged_metrics

    @property
    def progress_bar_metrics(self) -> dict[str, Tensor]:
        return self._metrics.progress_bar_metrics

    # ------------------------------------------------------------------ hardware
    @property
    def strategy(self) -> Strategy:
        return self._setup.strategy

    @property
    def accelerator(self) -> Accelerator:
        return self._setup.accelerator

    @property
    def precision(self) -> Precision:
        return self._setup.precision

    @property
    def num_nodes(self) -> int:
        return self._setup.num_nodes

    @property
    def num_devices(self) -> int:
        return self._setup.num_devices

    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    @property
    def global_rank(self) -> int:
        return self.strategy.global_rank

    @property
    def local_rank(self) -> int:
        return self.strategy.local_rank

    @property
    def node_rank(self) -> int:
        return self.strategy.node_rank

    @property
    def is_global_zero(self) -> bool:
        return self.strategy.is_global_zero

    # ------------------------------------------------------------------ objects of the run
    @property
    def loom_module(self) -> LoomModule:
        if self._module is None:
            raise ConfigurationError("The Trainer has no module yet: pass one to fit/validate/test/predict.")
        return self._module

    @property
    def model(self) -> LoomModule | None:
        return self._module

    @property
    def datamodule(self) -> LoomDataModule | None:
        return self._datamodule

    @property
    def optimizers(self) -> list[Optimizer]:
        return self._optimizers

    @property
    def lr_scheduler_configs(self) -> list[SchedulerConfig]:
        return self._scheduler_configs

    @property
    def callbacks(self) -> list[Callback]:
        return self._callbacks

    @property
    def checkpoint_callbacks(self) -> list[ModelCheckpoint]:
        return [c for c in self._callbacks if isinstance(c, ModelCheckpoint)]

    @property
    def checkpoint_callback(self) -> ModelCheckpoint | None:
        found = self.checkpoint_callbacks
        return found[0] if found else None

    @property
    def early_stopping_callbacks(self) -> list[EarlyStopping]:
        return [c for c in self._callbacks if isinstance(c, EarlyStopping)]

    @property
    def early_stopping_callback(self) -> EarlyStopping | None:
        found = self.early_stopping_callbacks
        return found[0] if found else None

    @property
    def progress_bar_callback(self) -> ProgressBar | None:
        return next((c for c in self._callbacks if isinstance(c, ProgressBar)), None)

    @property
    def loggers(self) -> list[Logger]:
        return self._loggers

    @property
    def logger(self) -> Logger | None:
        return self._loggers[0] if self._loggers else None

    @property
    def log_dir(self) -> str:
        """The first logger's run folder (agreed by every rank during a run), else ``default_root_dir``."""
        if self._log_dir is not None:
            return self._log_dir
        logger = self.logger
        return logger.log_dir if logger is not None else self.default_root_dir

    # ------------------------------------------------------------------ data sizes
    def _counts(self, kind: str) -> list[int | float]:
        return list(self._data.counts[kind]) if self._data is not None else []

    @property
    def num_training_batches(self) -> int | float:
        counts = self._counts("train")
        return counts[0] if counts else 0

    @property
    def num_val_batches(self) -> list[int | float]:
        return self._counts("val")

    @property
    def num_sanity_val_batches(self) -> list[int | float]:
        limit = self._config.num_sanity_val_steps
        return [count if limit == -1 else min(count, limit) for count in self.num_val_batches]

    @property
    def num_test_batches(self) -> list[int | float]:
        return self._counts("test")

    @property
    def num_predict_batches(self) -> list[int | float]:
        return self._counts("predict")

    @property
    def estimated_stepping_batches(self) -> int | float:
        """Optimizer steps the whole fit is expected to take (``max_steps`` caps it; ``inf`` if unbounded)."""
        config = self._config
        batches = self.num_training_batches
        if math.isinf(batches) or config.max_epochs == -1:
            per_run: int | float = math.inf
        else:
            per_run = math.ceil(batches / config.accumulate_grad_batches) * max(config.max_epochs, 1)
        return per_run if config.max_steps == -1 else min(per_run, config.max_steps)
