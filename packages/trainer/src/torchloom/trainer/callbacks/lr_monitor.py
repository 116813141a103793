"""LearningRateMonitor: logs each optimizer's learning rate (and momentum) to the trainer's loggers.

Names: ``lr-<OptimizerClass>`` (or the scheduler config's ``name``), ``-1``, ``-2``... for repeated
classes, and ``/pg1``, ``/pg2``... (or a param group's ``"name"``) when an optimizer has several groups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer
from typing_extensions import override

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.utils.rank_zero import rank_zero_warn
from torchloom.trainer.callbacks.callback import Callback

if TYPE_CHECKING:
    from torchloom.trainer.module import LoomModule
    from torchloom.trainer.trainer import Trainer

__all__ = ["LearningRateMonitor"]

INTERVALS = (None, "step", "epoch")


class LearningRateMonitor(Callback):
    """Logs learning rates during fit.

    ``logging_interval=None`` logs a scheduler's rates at its own interval (``"step"`` schedulers at every
    logged step, ``"epoch"`` ones at each epoch start); ``"step"`` or ``"epoch"`` logs all of them at that
    interval. Optimizers without a scheduler are logged at every chance. ``log_momentum`` adds
    ``<name>-momentum`` (``momentum``, or ``betas[0]`` for Adam-like optimizers).
    """

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False) -> None:
        if logging_interval not in INTERVALS:
            raise ConfigurationError(
                f"LearningRateMonitor(logging_interval={logging_interval!r}) is not valid; "
                f"expected one of {choices(INTERVALS)}."
            )
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self.last_logged: dict[str, float] = {}
        self._last_step = -1

    @override
    def on_train_start(self, trainer: Trainer, module: LoomModule) -> None:
        if not trainer.loggers:
            raise ConfigurationError(
                "LearningRateMonitor has nowhere to write: the Trainer has no logger (logger=False). "
                "Pass a logger or remove the callback."
            )
        if self.log_momentum and not any(
            _momentum(g) is not None for o, _, _ in self._sources(trainer) for g in o.param_groups
        ):
            rank_zero_warn(
                "LearningRateMonitor(log_momentum=True): no optimizer has momentum or betas; none is logged."
            )
        self._last_step = -1

    @override
    def on_train_batch_start(self, trainer: Trainer, module: LoomModule, batch: Any, batch_idx: int) -> None:
        if self.logging_interval == "epoch":
            return
        step = trainer.global_step
        if step == self._last_step or step % trainer.log_every_n_steps != 0:  # accumulation repeats a step; log it once
            return
        self._last_step = step
        self._log(trainer, "step" if self.logging_interval is None else None)

    @override
    def on_train_epoch_start(self, trainer: Trainer, module: LoomModule) -> None:
        if self.logging_interval != "step":
            self._log(trainer, "epoch" if self.logging_interval is None else None)

    def _log(self, trainer: Trainer, interval: str | None) -> None:
        """Logs the optimizers whose scheduler runs at ``interval`` (``None``: all), plus unscheduled ones."""
        stats: dict[str, float] = {}
        for optimizer, scheduled_at, name in self._sources(trainer):
            if scheduled_at is not None and interval is not None and scheduled_at != interval:
                continue
            groups = optimizer.param_groups
            for index, group in enumerate(groups):
                key = name if len(groups) == 1 else f"{name}/{group.get('name') or f'pg{index + 1}'}"
                stats[key] = float(group["lr"])
                momentum = _momentum(group) if self.log_momentum else None
                if momentum is not None:
                    stats[f"{key}-momentum"] = momentum
        if stats:
            self.last_logged.update(stats)
            for logger in trainer.loggers:
                logger.log_metrics(stats, step=trainer.global_step)

    def _sources(self, trainer: Trainer) -> list[tuple[Optimizer, str | None, str]]:
        """(optimizer, its scheduler's interval or None, base name) for every optimizer of the run."""
        entries: list[tuple[Optimizer, str | None, str | None]] = []
        scheduled: list[int] = []
        for config in trainer.lr_scheduler_configs:
            optimizer = config.scheduler.optimizer
            scheduled.append(id(optimizer))
            entries.append((optimizer, config.interval, config.name))
        entries += [(o, None, None) for o in trainer.optimizers if id(o) not in scheduled]
        seen: dict[str, int] = {}
        named: list[tuple[Optimizer, str | None, str]] = []
        for optimizer, interval, name in entries:
            base = name or f"lr-{type(optimizer).__name__}"
            count = seen.get(base, 0)
            seen[base] = count + 1
            named.append((optimizer, interval, base if count == 0 else f"{base}-{count}"))
        return named


def _momentum(group: dict[str, Any]) -> float | None:
    if "betas" in group:
        return float(group["betas"][0])
    if "momentum" in group:
        return float(group["momentum"])
    return None
