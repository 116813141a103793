"""``Trainer``: fit / validate / test / predict a ``LoomModule`` on any core strategy.

The constructor checks every argument (core's ``Connector`` for the hardware ones, ``config.py`` for
the loop ones) before anything runs. Each entry point hands one function to the strategy's launcher
(``adapter.launch``); in every worker ``runner.run`` sets the run up and drives the loops. Under a
launcher whose workers are other processes, the results come back through ``spawn.py``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from torchloom.core.accelerators.accelerator import Accelerator, DeviceSpec
from torchloom.core.connector import Connector, PluginArg
from torchloom.core.errors import ConfigurationError
from torchloom.core.loggers.logger import Logger
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies.strategy import Strategy
from torchloom.trainer import checkpoint as checkpointing
from torchloom.trainer import spawn
from torchloom.trainer.adapter import StrategyAdapter
from torchloom.trainer.callbacks import (
    ModelCheckpoint,
    ModelSummary,
    PreemptionCheckpoint,
    ProgressBar,
    Timer,
    TQDMProgressBar,
)
from torchloom.trainer.callbacks.callback import Callback
from torchloom.trainer.config import TrainerConfig, parse_callbacks, parse_config, parse_loggers
from torchloom.trainer.data_source import DataSource
from torchloom.trainer.datamodule import LoomDataModule
from torchloom.trainer.logging import MetricStore
from torchloom.trainer.loops.optimization import AutomaticOptimization, ManualOptimization
from torchloom.trainer.module import LoomModule, is_overridden
from torchloom.trainer.optimizers import SchedulerConfig
from torchloom.trainer.runner import LoopControl, run_worker
from torchloom.trainer.state import FitProgress, TrainerState

__all__ = ["Trainer", "apply_torch_flags"]


class Trainer(LoopControl):
    """Runs the training loop for a ``LoomModule``; the arguments mean what PyTorch Lightning users know."""

    def __init__(
        self,
        *,
        accelerator: str | Accelerator = "auto",
        strategy: str | Strategy = "auto",
        devices: DeviceSpec = "auto",
        num_nodes: int = 1,
        precision: str | int | Precision | None = None,
        plugins: PluginArg | Sequence[PluginArg] | None = None,
        logger: Logger | Sequence[Logger] | bool | None = None,
        callbacks: Callback | Sequence[Callback] | None = None,
        max_epochs: int | None = None,
        min_epochs: int | None = None,
        max_steps: int = -1,
        min_steps: int | None = None,
        max_time: str | datetime.timedelta | Mapping[str, int] | None = None,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        val_check_interval: int | float | None = None,
        check_val_every_n_epoch: int | None = 1,
        num_sanity_val_steps: int | None = None,
        log_every_n_steps: int | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
        deterministic: bool | str | None = None,
        benchmark: bool | None = None,
        enable_checkpointing: bool | None = None,
        enable_progress_bar: bool | None = None,
        enable_model_summary: bool | None = None,
        fast_dev_run: bool | int = False,
        default_root_dir: str | os.PathLike[str] | None = None,
        use_distributed_sampler: bool = True,
        sync_batchnorm: bool = False,
        reload_dataloaders_every_n_epochs: int = 0,
        inference_mode: bool = True,
        detect_anomaly: bool = False,
        barebones: bool = False,
    ) -> None:
        self._config = parse_config(
            max_epochs=max_epochs,
            min_epochs=min_epochs,
            max_steps=max_steps,
            min_steps=min_steps,
            max_time=max_time,
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            val_check_interval=val_check_interval,
            check_val_every_n_epoch=check_val_every_n_epoch,
            num_sanity_val_steps=num_sanity_val_steps,
            log_every_n_steps=log_every_n_steps,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
            deterministic=deterministic,
            benchmark=benchmark,
            enable_checkpointing=enable_checkpointing,
            enable_progress_bar=enable_progress_bar,
            enable_model_summary=enable_model_summary,
            fast_dev_run=fast_dev_run,
            default_root_dir=default_root_dir,
            use_distributed_sampler=use_distributed_sampler,
            sync_batchnorm=sync_batchnorm,
            reload_dataloaders_every_n_epochs=reload_dataloaders_every_n_epochs,
            inference_mode=inference_mode,
            detect_anomaly=detect_anomaly,
            barebones=barebones,
        )
        self._setup = Connector(
            accelerator=accelerator,
            strategy=strategy,
            devices=devices,
            num_nodes=num_nodes,
            precision=precision,
            plugins=plugins,
        ).resolve()
        self._adapter = StrategyAdapter(self._setup.strategy)
        self._loggers = parse_loggers(logger, self._config)
        self._base_callbacks = _with_default_callbacks(parse_callbacks(callbacks), self._config)
        self._callbacks: list[Callback] = list(self._base_callbacks)
        self._reset_hook_cache()
        self._metrics = MetricStore(self._adapter.reduce, enabled=not self._config.barebones)
        self._progress = FitProgress()
        self.state = TrainerState()
        self.should_stop = False
        self._module: LoomModule | None = None
        self._datamodule: LoomDataModule | None = None
        self._data: DataSource | None = None
        self._optimizers: list[Optimizer] = []
        self._scheduler_configs: list[SchedulerConfig] = []
        self._optimization: AutomaticOptimization | ManualOptimization = AutomaticOptimization(self)
        self._log_dir: str | None = None
        self._resume_rng: dict[str, Any] | None = None
        self._val_check_batch: int | float = float("inf")
        self._val_enabled = False
        self._loaded_epoch = 0  # the epoch the training dataloader was last (re)loaded in
        apply_torch_flags(self._config)

    @property
    def config(self) -> TrainerConfig:
        return self._config

    # ------------------------------------------------------------------ entry points
    def fit(
        self,
        model: LoomModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: LoomDataModule | None = None,
        ckpt_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """Trains ``model``; ``ckpt_path`` (a file, ``"last"`` or ``"best"``) resumes a saved run exactly."""
        _check_model(model, "fit")
        if not is_overridden(model, "training_step"):
            raise ConfigurationError(
                f"{type(model).__name__} defines no training_step(batch, batch_idx), which fit() needs. Valid: "
                "override training_step to return the loss."
            )
        checkpointing.check_ckpt_path(ckpt_path)
        _check_data_arguments(datamodule, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders)
        source = DataSource({"train": train_dataloaders, "val": val_dataloaders}, datamodule, "fit")
        self._launch("fit", model, source, ckpt_path)

    def validate(
        self,
        model: LoomModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | os.PathLike[str] | None = None,
        verbose: bool = True,
        datamodule: LoomDataModule | None = None,
    ) -> list[dict[str, float]]:
        """Runs ``validation_step`` over the validation data; returns the logged epoch metrics, one dict per dataloader."""
        return self._evaluate("validate", model, dataloaders, ckpt_path, verbose, datamodule)

    def test(
        self,
        model: LoomModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | os.PathLike[str] | None = None,
        verbose: bool = True,
        datamodule: LoomDataModule | None = None,
    ) -> list[dict[str, float]]:
        """Runs ``test_step`` over the test data; returns the logged epoch metrics, one dict per dataloader."""
        return self._evaluate("test", model, dataloaders, ckpt_path, verbose, datamodule)

    def predict(
        self,
        model: LoomModule | None = None,
        dataloaders: Any = None,
        datamodule: LoomDataModule | None = None,
        ckpt_path: str | os.PathLike[str] | None = None,
    ) -> list[Any]:
        """``predict_step``'s outputs: a list per batch, or a list of such lists for several dataloaders."""
        module = self._model_for("predict", model)
        checkpointing.check_ckpt_path(ckpt_path)
        _check_data_arguments(datamodule, dataloaders=dataloaders)
        source = DataSource({"predict": dataloaders}, datamodule, "predict")
        outputs: list[list[Any]] = self._launch("predict", module, source, ckpt_path)
        return outputs[0] if len(outputs) == 1 else outputs

    def save_checkpoint(self, filepath: str | os.PathLike[str], weights_only: bool = False) -> None:
        """Writes a checkpoint of the current state; call it on every rank (the strategy picks the writer)."""
        if self._module is None:
            raise ConfigurationError("save_checkpoint() needs a module: call it during or after fit/validate/test.")
        self._adapter.save_checkpoint(filepath, checkpointing.dump_checkpoint(self, weights_only=weights_only))

    # ------------------------------------------------------------------ running
    def _evaluate(
        self,
        fn: str,
        model: LoomModule | None,
        dataloaders: Any,
        ckpt_path: str | os.PathLike[str] | None,
        verbose: bool,
        datamodule: LoomDataModule | None,
    ) -> list[dict[str, float]]:
        module = self._model_for(fn, model)
        step = "validation_step" if fn == "validate" else "test_step"
        if not is_overridden(module, step):
            raise ConfigurationError(
                f"{type(module).__name__} defines no {step}(batch, batch_idx), which {fn}() needs."
            )
        checkpointing.check_ckpt_path(ckpt_path)
        _check_data_arguments(datamodule, dataloaders=dataloaders)
        kind = "val" if fn == "validate" else "test"
        results: list[dict[str, float]] = self._launch(
            fn, module, DataSource({kind: dataloaders}, datamodule, fn), ckpt_path
        )
        if verbose and self.is_global_zero:
            _print_results(fn, results)
        return results

    def _model_for(self, fn: str, model: LoomModule | None) -> LoomModule:
        if model is None:
            if self._module is None:
                raise ConfigurationError(f"{fn}() got no model and the Trainer has not fitted one. Valid: {fn}(model).")
            return self._module
        _check_model(model, fn)
        return model

    def _launch(self, fn: str, module: LoomModule, source: DataSource, ckpt_path: Any) -> Any:
        self.state = TrainerState(fn=fn)
        if self.strategy.launcher is not None:
            for logger in self._loggers:
                logger.version  # noqa: B018 - fixed here, so every worker writes to the same run folder
        result = self._adapter.launch(run_worker, self, fn, module, source, ckpt_path, os.getpid())
        self._module = module
        self._datamodule = source.datamodule
        output = spawn.apply(self, result)
        self.state.stage = None
        return output


def apply_torch_flags(config: TrainerConfig) -> None:
    """``deterministic`` and ``benchmark`` as torch's global switches (``None`` leaves a switch as it is)."""
    if config.deterministic is not None:
        enabled, warn_only = bool(config.deterministic), config.deterministic == "warn"
        current = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        if current != (enabled, warn_only):  # setting it imports torch._inductor (seconds): only when it changes
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        if enabled:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs it
    benchmark = config.benchmark
    if benchmark is None and config.deterministic:
        benchmark = False
    if benchmark is not None:
        torch.backends.cudnn.benchmark = benchmark


def _with_default_callbacks(callbacks: list[Callback], config: TrainerConfig) -> list[Callback]:
    """The user's callbacks plus the defaults the flags ask for; checkpoint callbacks go last (they save the
    state the others have just updated)."""
    given_checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    given_bars = [c for c in callbacks if isinstance(c, ProgressBar)]
    for flag, found, kind in (
        ("enable_checkpointing", given_checkpoints, "ModelCheckpoint"),
        ("enable_progress_bar", given_bars, "progress bar"),
    ):
        if found and not getattr(config, flag):
            raise ConfigurationError(
                f"{flag}=False (or barebones=True), but callbacks holds a {kind} ({found[0]!r}). Valid: remove it, "
                f"or leave {flag} unset."
            )
    front: list[Callback] = []
    if config.enable_model_summary and not any(isinstance(c, ModelSummary) for c in callbacks):
        front.append(ModelSummary())
    if config.enable_progress_bar and not given_bars:
        front.append(TQDMProgressBar())
    middle = [c for c in callbacks if not isinstance(c, (ModelCheckpoint, PreemptionCheckpoint))]
    if config.max_time is not None:
        middle.append(Timer(duration=config.max_time, interval="step"))
    checkpoints: list[Callback] = list(given_checkpoints)
    if config.enable_checkpointing and not given_checkpoints:
        checkpoints.append(ModelCheckpoint())
    # last: its save at a step's end holds what every other callback did in that step
    preemption = [c for c in callbacks if isinstance(c, PreemptionCheckpoint)]
    if config.enable_checkpointing and not preemption:
        preemption.append(PreemptionCheckpoint())
    return front + middle + checkpoints + preemption


def _check_model(model: object, fn: str) -> None:
    if not isinstance(model, LoomModule):
        raise ConfigurationError(
            f"{fn}() got {type(model).__name__}; it needs a LoomModule. Valid: a subclass of "
            "torchloom.trainer.LoomModule (change the base class of a LightningModule)."
        )


def _check_data_arguments(datamodule: object, **dataloaders: Any) -> None:
    if datamodule is not None and not isinstance(datamodule, LoomDataModule):
        raise ConfigurationError(f"datamodule={datamodule!r} is not a LoomDataModule. Valid: a LoomDataModule or None.")
    given = [name for name, value in dataloaders.items() if value is not None]
    if datamodule is not None and given:
        raise ConfigurationError(
            f"Pass either {' and '.join(given)} or datamodule, not both: the Trainer would not know which data to use."
        )


def _print_results(fn: str, results: Iterable[Mapping[str, float]]) -> None:
    for index, metrics in enumerate(results):
        if not metrics:
            continue
        title = f"{fn} results" + (f" (dataloader {index})" if index else "")
        width = max(len(name) for name in metrics)
        lines = [f"  {name:<{width}}  {value:.6g}" for name, value in sorted(metrics.items())]
        print("\n".join([title, *lines]), flush=True)
