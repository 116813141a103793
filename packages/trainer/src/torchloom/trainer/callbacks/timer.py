"""Timer: measures the time spent in each stage and stops training once a time budget is used up.

Elapsed training time survives a resume (it is part of the callback's checkpoint state), so a budget
covers the whole run, not each restart. Ranks agree on the decision (any rank past the budget stops all),
so clocks that drift apart cannot leave one rank waiting for the others.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.utils.rank_zero import rank_zero_info
from torchloom.trainer.callbacks.callback import Callback

if TYPE_CHECKING:
    from torchloom.trainer.module import LoomModule
    from torchloom.trainer.trainer import Trainer

__all__ = ["Timer", "parse_duration"]

INTERVALS = ("step", "epoch")
STAGES = ("train", "validate", "test", "predict")
_DURATION = re.compile(r"(\d+):(\d{1,2}):(\d{1,2}):(\d{1,2})")
_clock = time.monotonic  # tests replace it


def parse_duration(duration: str | timedelta | dict[str, float]) -> timedelta:
    """``"DD:HH:MM:SS"``, a ``timedelta`` or ``timedelta`` keywords (``{"hours": 2}``) as a ``timedelta``."""
    if isinstance(duration, timedelta):
        parsed = duration
    elif isinstance(duration, str) and (match := _DURATION.fullmatch(duration.strip())):
        days, hours, minutes, seconds = (int(g) for g in match.groups())
        parsed = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    elif isinstance(duration, dict):
        try:
            parsed = timedelta(**duration)
        except TypeError as error:
            raise ConfigurationError(f"Timer(duration={duration!r}): {error}; use timedelta keywords.") from None
    else:
        raise ConfigurationError(
            f"Timer(duration={duration!r}) is not valid: pass 'DD:HH:MM:SS' (e.g. '00:12:00:00'), a "
            "datetime.timedelta or a dict of timedelta keywords such as {'hours': 12}."
        )
    if parsed.total_seconds() < 0:
        raise ConfigurationError(f"Timer(duration={duration!r}) is negative.")
    return parsed


class Timer(Callback):
    """Times the train/validate/test/predict stages; with ``duration``, stops fit when it is exceeded.

    ``interval`` says when the budget is checked: after every training ``"step"`` or every ``"epoch"``.
    """

    def __init__(
        self,
        duration: str | timedelta | dict[str, float] | None = None,
        interval: str = "step",
        verbose: bool = True,
    ) -> None:
        if interval not in INTERVALS:
            raise ConfigurationError(
                f"Timer(interval={interval!r}) is not valid; expected one of {choices(INTERVALS)}."
            )
        self._duration = parse_duration(duration).total_seconds() if duration is not None else None
        self._interval = interval
        self._verbose = verbose
        self._start: dict[str, float | None] = dict.fromkeys(STAGES)
        self._end: dict[str, float | None] = dict.fromkeys(STAGES)
        self._offset = 0.0  # training seconds spent before a resume

    @property
    def duration(self) -> float | None:
        """The budget in seconds, or ``None``."""
        return self._duration

    def start_time(self, stage: str = "train") -> float | None:
        """The clock value (``time.monotonic``) when ``stage`` last started."""
        return self._start[_check_stage(stage)]

    def end_time(self, stage: str = "train") -> float | None:
        return self._end[_check_stage(stage)]

    def time_elapsed(self, stage: str = "train") -> float:
        """Seconds spent in ``stage`` (for "train": including time before a resume)."""
        start, end = self.start_time(stage), self.end_time(stage)
        offset = self._offset if stage == "train" else 0.0
        if start is None:
            return offset
        return offset + (end if end is not None else _clock()) - start

    def time_remaining(self, stage: str = "train") -> float | None:
        return None if self._duration is None else self._duration - self.time_elapsed(stage)

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: Trainer, module: LoomModule) -> None:
        self._begin("train")
        if self._duration is not None and self._offset >= self._duration:
            self._check(trainer)  # the budget was spent before a resume: stop before the first step

    @override
    def on_train_end(self, trainer: Trainer, module: LoomModule) -> None:
        self._end["train"] = _clock()

    @override
    def on_validation_start(self, trainer: Trainer, module: LoomModule) -> None:
        self._begin("validate")

    @override
    def on_validation_end(self, trainer: Trainer, module: LoomModule) -> None:
        self._end["validate"] = _clock()

    @override
    def on_test_start(self, trainer: Trainer, module: LoomModule) -> None:
        self._begin("test")

    @override
    def on_test_end(self, trainer: Trainer, module: LoomModule) -> None:
        self._end["test"] = _clock()

    @override
    def on_predict_start(self, trainer: Trainer, module: LoomModule) -> None:
        self._begin("predict")

    @override
    def on_predict_end(self, trainer: Trainer, module: LoomModule) -> None:
        self._end["predict"] = _clock()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, module: LoomModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._interval == "step":
            self._check(trainer)

    @override
    def on_train_epoch_end(self, trainer: Trainer, module: LoomModule) -> None:
        if self._interval == "epoch":
            self._check(trainer)

    def _begin(self, stage: str) -> None:
        self._start[stage] = _clock()
        self._end[stage] = None

    def _check(self, trainer: Trainer) -> None:
        if self._duration is None:
            return
        exceeded = trainer.strategy.reduce_boolean_decision(self.time_elapsed() >= self._duration, all=False)
        if exceeded and not trainer.should_stop:
            trainer.should_stop = True
            if self._verbose:
                rank_zero_info(f"Time limit of {timedelta(seconds=self._duration)} reached; stopping the training.")

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"time_elapsed": {stage: self.time_elapsed(stage) for stage in STAGES}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._offset = float(state_dict["time_elapsed"].get("train", 0.0))


def _check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ConfigurationError(f"Timer stage {stage!r} is not valid; expected one of {choices(STAGES)}.")
    return stage
