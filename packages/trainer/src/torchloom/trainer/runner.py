"""One run of fit / validate / test / predict inside a worker, from setup to teardown.

The order (docs/trainer/hooks.md has the full hook list)::

    configure_callbacks -> prepare_data (local rank 0, then a barrier) -> setup(stage)
    -> configure_model -> *_dataloader -> configure_optimizers (fit) -> [checkpoint weights]
    -> strategy setup -> [checkpoint training state] -> the stage's loops -> teardown(stage)

Under a sharded strategy (``restore_checkpoint_after_setup``) ``configure_model`` builds its layers
empty (meta) for the strategy to materialise shard by shard, the optimizers made before setup are
re-bound to the sharded parameters by the strategy, and the checkpoint's weights are loaded after setup.
``LoopControl`` (mixed into ``Trainer``) holds what the loops ask the trainer: stop conditions,
validation checks, logging to the loggers, reloading dataloaders.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

import torch

from torchloom.core.errors import ConfigurationError
from torchloom.core.utils.rank_zero import rank_zero_warn
from torchloom.trainer import checkpoint as checkpointing
from torchloom.trainer.callbacks.preemption import FitPreempted
from torchloom.trainer.hooks import HookCaller
from torchloom.trainer.logging import split_by_dataloader
from torchloom.trainer.loops import AutomaticOptimization, EvaluationLoop, FitLoop, ManualOptimization, PredictionLoop
from torchloom.trainer.module import is_overridden
from torchloom.trainer.optimizers import parse_optimizers
from torchloom.trainer.properties import TrainerProperties
from torchloom.trainer.restarts import restart_ckpt_path
from torchloom.trainer.spawn import WorkerResult, collect

if TYPE_CHECKING:
    from torchloom.trainer.data_source import DataSource
    from torchloom.trainer.module import LoomModule
    from torchloom.trainer.trainer import Trainer

__all__ = ["LoopControl", "run_worker"]

_STAGE_OF = {"fit": "train", "validate": "validate", "test": "test", "predict": "predict"}


def run_worker(
    trainer: Trainer, fn: str, module: LoomModule, source: DataSource, ckpt_path: Any, caller_pid: int
) -> WorkerResult:
    """What every worker runs: the whole run, then its results packed for the caller."""
    from torchloom.trainer.trainer import apply_torch_flags

    apply_torch_flags(trainer._config)  # global switches do not travel to spawned processes
    trainer._begin_run(fn, module, source)
    try:
        with torch.autograd.set_detect_anomaly(trainer._config.detect_anomaly):
            output = _run(trainer, fn, ckpt_path)
    except BaseException as exception:
        trainer.state.stage = None
        for callback in trainer.callbacks:
            callback.on_exception(trainer, module, exception)
        for logger in trainer.loggers:
            logger.finalize("failed")
        trainer._adapter.teardown()
        raise
    for logger in trainer.loggers:
        logger.finalize("success")
    result = collect(trainer, output, caller_pid)  # before teardown: gathering sharded weights needs the group
    trainer._adapter.teardown()  # a later fit/test in this process sets the strategy up afresh
    if trainer.strategy.root_device.type != "cpu":
        module.cpu()  # frees the device; results and the module are used on the CPU after a run
    trainer.state.stage = None
    return result


def _run(trainer: Trainer, fn: str, ckpt_path: Any) -> Any:
    module = trainer.loom_module
    adapter = trainer._adapter
    stage = _STAGE_OF[fn]
    trainer._resolve_log_dir()
    _prepare_data(trainer)
    datamodule = trainer.datamodule
    if datamodule is not None:
        datamodule.setup(fn)
    trainer._call("setup", fn)
    with adapter.module_init_context():
        trainer._call_module("configure_model")
    if trainer._config.sync_batchnorm and adapter.is_distributed:
        module = trainer._module = convert_sync_batchnorm(module, trainer.strategy.root_device)
    trainer._load_data(fn)
    optimizers = _configure_optimizers(trainer) if fn == "fit" else []
    path = checkpointing.resolve_ckpt_path(trainer, restart_ckpt_path(trainer, fn, ckpt_path))
    checkpoint = checkpointing.read_checkpoint(trainer, path) if path is not None else None
    if checkpoint is not None and not trainer.strategy.restore_checkpoint_after_setup:
        checkpointing.restore_weights(trainer, checkpoint, module)
    config = trainer._config
    trainer.strategy.configure_loop(  # an engine built from the loop's settings (DeepSpeed) is built next
        micro_batch_size=_batch_size(trainer._data_loaders("train")) if fn == "fit" else None,
        accumulation_steps=config.accumulate_grad_batches,
        gradient_clip_val=config.gradient_clip_val,
        gradient_clip_algorithm=config.gradient_clip_algorithm,
    )
    # sharded strategies replace the parameters here; optimizers made above are pointed at the new ones
    wrapped, optimizers = adapter.setup(module, optimizers)
    if fn == "fit":  # validate/test/predict keep the fitted optimizers (a later save_checkpoint holds them)
        trainer._optimizers = optimizers
    if path is not None:
        checkpointing.restore_after_setup(trainer, path, checkpoint, wrapped, fn)
    trainer.state.stage = stage
    output: Any = None
    if fn == "fit":
        _log_hyperparams(trainer)
        _fit(trainer)
    elif fn == "predict":
        output = PredictionLoop(trainer).run(trainer._data_loaders("predict"), trainer._data_counts("predict"))
    else:
        kind = "val" if fn == "validate" else "test"
        loaders = trainer._data_loaders(kind)
        logged = EvaluationLoop(trainer, fn).run(loaders, trainer._data_counts(kind))
        if logged:
            trainer._log_metrics(logged)
        metrics = {k: float(v) for k, v in trainer._metrics.last_epoch_metrics(fn).items()}
        output = split_by_dataloader(metrics, len(loaders)) if len(loaders) > 1 else [metrics]
    trainer.state.stage = None
    if datamodule is not None:
        datamodule.teardown(fn)
    trainer._call("teardown", fn)
    return output


def _batch_size(loaders: list[Any]) -> int | None:
    """The batch size of the first training loader, when it has a fixed one."""
    size = getattr(loaders[0], "batch_size", None) if loaders else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def convert_sync_batchnorm(module: LoomModule, device: torch.device) -> LoomModule:
    """Batch norm layers that reduce their statistics over every process (torch supports it on GPUs)."""
    if device.type == "cpu":
        raise ConfigurationError(
            "sync_batchnorm=True needs accelerator devices: torch's SyncBatchNorm does not run on the CPU. Valid: "
            "sync_batchnorm=False on CPUs, or accelerator='gpu'."
        )
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)  # type: ignore[no-untyped-call]
    return cast("LoomModule", converted)


def _prepare_data(trainer: Trainer) -> None:
    """``prepare_data`` once per node: on local rank 0, while the other ranks wait at a barrier."""
    if trainer.local_rank == 0:
        if trainer.datamodule is not None:
            trainer.datamodule.prepare_data()
        trainer._call_module("prepare_data")
    trainer._adapter.barrier("prepare_data")


def _configure_optimizers(trainer: Trainer) -> list[torch.optim.Optimizer]:
    module = trainer.loom_module
    optimizers, configs = parse_optimizers(trainer._call_module("configure_optimizers"))
    if module.automatic_optimization and len(optimizers) > 1:
        raise ConfigurationError(
            f"configure_optimizers() returned {len(optimizers)} optimizers; automatic optimization steps one. "
            "Valid: return one optimizer, or set self.automatic_optimization = False and step them in training_step."
        )
    if not module.automatic_optimization and trainer._config.gradient_clip_val is not None:
        raise ConfigurationError(
            f"gradient_clip_val={trainer._config.gradient_clip_val} clips in automatic optimization only. Valid: "
            "leave it unset and call self.clip_gradients(optimizer, ...) in training_step."
        )
    trainer._optimizers, trainer._scheduler_configs = optimizers, configs
    return optimizers


def _log_hyperparams(trainer: Trainer) -> None:
    params = dict(trainer.loom_module.hparams_initial)
    if trainer.datamodule is not None:
        params.update(trainer.datamodule.hparams_initial)
    if params:
        for logger in trainer.loggers:
            logger.log_hyperparams(params)


def _fit(trainer: Trainer) -> None:
    trainer._call("on_fit_start")
    if trainer._val_enabled and trainer._config.num_sanity_val_steps != 0:
        trainer.state.stage = "sanity_check"
        trainer._call("on_sanity_check_start")
        EvaluationLoop(trainer, "validate").run(trainer._data_loaders("val"), trainer._data_counts("val"), sanity=True)
        trainer._call("on_sanity_check_end")
        trainer.state.stage = "train"
    try:
        FitLoop(trainer).run()
    except FitPreempted:  # a checkpoint of this step is saved: leave mid-epoch, as after an error but cleanly
        return
    trainer._call("on_fit_end")


class LoopControl(HookCaller, TrainerProperties):
    """The base of ``Trainer``: the questions and services the loops need from it."""

    _base_callbacks: list[Any]
    _optimization: AutomaticOptimization | ManualOptimization
    _val_check_batch: int | float
    _val_enabled: bool
    _loaded_epoch: int
    _resume_rng: dict[str, Any] | None
    should_stop: bool

    @property
    def _trainer(self) -> Trainer:
        return cast("Trainer", self)

    def _begin_run(self, fn: str, module: LoomModule, source: DataSource) -> None:
        trainer = self._trainer
        module._attach(trainer)
        self._module = module
        self._datamodule = source.datamodule
        if source.datamodule is not None:
            source.datamodule._attach(trainer)
        self._data = source
        self.state.fn = fn
        self.should_stop = False
        self._callbacks = _merge_callbacks(self._base_callbacks, module.configure_callbacks())
        self._reset_hook_cache()
        optimization = AutomaticOptimization if module.automatic_optimization else ManualOptimization
        self._optimization = optimization(trainer)
        self._adapter.before_optimizer_step = self._optimization.before_optimizer_step
        self._adapter.after_optimizer_step = self._count_optimizer_step
        if fn == "fit":
            self._metrics.reset()

    def _resolve_log_dir(self) -> None:
        logger = self.logger
        local = logger.log_dir if logger is not None else self.default_root_dir
        self._log_dir = self._adapter.broadcast(local)  # loggers pick versions on rank 0 only

    def _count_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._progress.global_step += 1

    def _train_loader(self) -> Any:
        assert self._data is not None
        return self._data.train_loader

    def _data_loaders(self, kind: str) -> list[Any]:
        return self._data.loaders[kind] if self._data is not None else []

    def _data_counts(self, kind: str) -> list[int | float]:
        return self._data.counts[kind] if self._data is not None else []

    def _load_data(self, fn: str) -> None:
        data = self._data
        assert data is not None
        if fn == "fit":
            data.load(self._trainer, "train", required=True)
            data.load(self._trainer, "val", required=False)
            self._loaded_epoch = self.current_epoch
            self._check_validation()
        else:
            kind = {"validate": "val", "test": "test", "predict": "predict"}[fn]
            data.load(self._trainer, kind, required=True)

    def _check_validation(self) -> None:
        """Whether fit validates, and every how many training batches."""
        has_batches = sum(self.num_val_batches) > 0
        defines_step = is_overridden(self.loom_module, "validation_step")
        if has_batches and not defines_step:
            rank_zero_warn("There is validation data but the module defines no validation_step; validation is skipped.")
        self._val_enabled = has_batches and defines_step
        interval, batches = self._config.val_check_interval, self.num_training_batches
        if not self._val_enabled or self._config.check_val_every_n_epoch is None:
            self._val_check_batch = interval
        elif isinstance(interval, int):
            if interval > batches:
                raise ConfigurationError(
                    f"val_check_interval={interval} is larger than the {batches} training batches of an epoch, so "
                    "validation would never run. Valid: an int <= the number of training batches, a float fraction "
                    "of the epoch, or check_val_every_n_epoch=None to count batches across epochs."
                )
            self._val_check_batch = interval
        elif math.isinf(batches):
            if interval != 1.0:
                raise ConfigurationError(
                    f"val_check_interval={interval} is a fraction of an epoch, but the training dataloader has no "
                    "length. Valid: an int count of batches, or 1.0."
                )
            self._val_check_batch = math.inf
        else:
            self._val_check_batch = max(1, int(batches * interval))

    def _validation_enabled(self) -> bool:
        return self._val_enabled

    def _reload_dataloaders_if_due(self) -> None:
        every = self._config.reload_dataloaders_every_n_epochs
        if every > 0 and self.current_epoch - self._loaded_epoch >= every:
            self._load_data("fit")

    def _run_validation(self) -> None:
        self.state.stage = "validate"
        logged = EvaluationLoop(self._trainer, "validate").run(self._data_loaders("val"), self._data_counts("val"))
        if logged:
            self._log_metrics(logged)
        self.state.stage = "train"

    def _reached_max_steps(self) -> bool:
        return self._config.max_steps != -1 and self.global_step >= self._config.max_steps

    def _can_stop_early(self) -> bool:
        """``should_stop`` is honoured once ``min_epochs`` and ``min_steps`` are met."""
        epochs_done = self.current_epoch + int(self._progress.epoch_finished)
        return epochs_done >= self._config.min_epochs and self.global_step >= self._config.min_steps

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        if self.state.fn == "fit":
            metrics = {**metrics, "epoch": float(self.current_epoch)}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)


def _merge_callbacks(base: list[Any], extra: list[Any] | None) -> list[Any]:
    """``configure_callbacks()``'s callbacks replace the trainer's of the same type; checkpoint ones stay last."""
    from torchloom.trainer.callbacks import ModelCheckpoint
    from torchloom.trainer.config import parse_callbacks

    added = parse_callbacks(extra)
    if not added:
        return list(base)
    types = {type(c) for c in added}
    merged = [c for c in base if type(c) not in types] + added
    return [c for c in merged if not isinstance(c, ModelCheckpoint)] + [
        c for c in merged if isinstance(c, ModelCheckpoint)
    ]
