"""EarlyStopping: stops fit when a monitored metric stops improving (or crosses a threshold, or is not finite).

It checks at the end of validation, or at the end of the training epoch when the fit has no validation.
Ranks may see different values; they agree with ``strategy.reduce_boolean_decision`` (any rank that
wants to stop stops all), so every rank leaves the loop at the same step and none waits forever.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import Tensor
from typing_extensions import override

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.utils.rank_zero import rank_zero_info, rank_zero_warn
from torchloom.trainer.callbacks.callback import Callback
from torchloom.trainer.callbacks.checkpoint import MODES, has_validation, skips_callbacks

if TYPE_CHECKING:
    from torchloom.trainer.module import LoomModule
    from torchloom.trainer.trainer import Trainer

__all__ = ["EarlyStopping"]


class EarlyStopping(Callback):
    """Sets ``trainer.should_stop`` once ``monitor`` has not improved by more than ``min_delta`` for
    ``patience`` checks in a row, once it is better than ``stopping_threshold``, worse than
    ``divergence_threshold``, or (with ``check_finite``) NaN/infinite.

    With ``strict=False`` a missing metric only warns; by default it is an error naming the logged keys.
    """

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        mode: str = "min",
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_finite: bool = True,
        verbose: bool = False,
        strict: bool = True,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ConfigurationError(f"EarlyStopping(monitor={monitor!r}): pass the name of a logged metric.")
        if mode not in MODES:
            raise ConfigurationError(f"EarlyStopping(mode={mode!r}) is not valid; expected one of {choices(MODES)}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ConfigurationError(f"EarlyStopping(patience={patience!r}) must be an int >= 0.")
        if not isinstance(min_delta, (int, float)) or isinstance(min_delta, bool) or min_delta < 0:
            raise ConfigurationError(f"EarlyStopping(min_delta={min_delta!r}) must be a number >= 0.")
        self.monitor = monitor
        self.min_delta = float(min_delta)
        self.patience = patience
        self.mode = mode
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.check_finite = check_finite
        self.verbose = verbose
        self.strict = strict
        self.wait_count = 0
        self.stopped_epoch = 0
        self.best_score = math.inf if mode == "min" else -math.inf
        self.stopping_reason: str | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    # ------------------------------------------------------------------ hooks
    @override
    def on_validation_end(self, trainer: Trainer, module: LoomModule) -> None:
        if not skips_callbacks(trainer):
            self._check(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, module: LoomModule) -> None:
        if not has_validation(trainer) and not skips_callbacks(trainer):
            self._check(trainer)

    # ------------------------------------------------------------------ the decision
    def _check(self, trainer: Trainer) -> None:
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            message = (
                f"EarlyStopping(monitor={self.monitor!r}) found no metric named {self.monitor!r}; the logged metrics "
                f"are {choices(sorted(metrics))}. Log it with self.log({self.monitor!r}, value) in the LoomModule."
            )
            if self.strict:
                raise ConfigurationError(message)
            rank_zero_warn(message)
            return
        value = metrics[self.monitor]
        current = float(value.item() if isinstance(value, Tensor) else value)
        reason = self.evaluate(current)
        should_stop = trainer.strategy.reduce_boolean_decision(reason is not None, all=False)
        if should_stop:
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason = reason or "another rank asked to stop"
            if self.verbose:
                rank_zero_info(f"EarlyStopping at epoch {trainer.current_epoch}: {self.stopping_reason}.")

    def evaluate(self, current: float) -> str | None:
        """Updates the best score and the wait count with ``current``; returns why to stop, or ``None``."""
        if self.check_finite and not math.isfinite(current):
            return f"{self.monitor} = {current} is not finite; the best score was {self.best_score:.6g}"
        if self.stopping_threshold is not None and self._better(current, self.stopping_threshold):
            return f"{self.monitor} = {current:.6g} reached the stopping threshold {self.stopping_threshold}"
        if self.divergence_threshold is not None and self._better(self.divergence_threshold, current):
            return f"{self.monitor} = {current:.6g} diverged past {self.divergence_threshold}"
        if self._improves(current):
            self.best_score = current
            self.wait_count = 0
            return None
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return (
                f"{self.monitor} did not improve by more than {self.min_delta} for {self.wait_count} checks; "
                f"the best score is {self.best_score:.6g}"
            )
        return None

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def _improves(self, current: float) -> bool:
        if self.mode == "min":
            return current < self.best_score - self.min_delta
        return current > self.best_score + self.min_delta

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "wait_count": self.wait_count,
            "stopped_epoch": self.stopped_epoch,
            "best_score": self.best_score,
            "patience": self.patience,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = int(state_dict["wait_count"])
        self.stopped_epoch = int(state_dict["stopped_epoch"])
        self.best_score = float(state_dict["best_score"])
