"""The Trainer's loop arguments, checked once and frozen into a ``TrainerConfig``.

Every argument of ``Trainer(...)`` that is not about hardware (those go to core's ``Connector``) is
parsed here, at construction, so a bad value fails before any process starts. The meanings are the
ones PyTorch Lightning users know: a float ``limit_*`` / ``val_check_interval`` is a fraction of an
epoch, an int a count of batches; ``max_epochs=None`` means 1000 unless ``max_steps`` is set.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.loggers.logger import Logger
from torchloom.trainer.callbacks.callback import Callback

__all__ = ["DEFAULT_MAX_EPOCHS", "TrainerConfig", "parse_callbacks", "parse_config", "parse_loggers", "parse_max_time"]

DEFAULT_MAX_EPOCHS = 1000
CLIP_ALGORITHMS = ("norm", "value")
_TIME_UNITS = ("days", "hours", "minutes", "seconds")
_TIME_STRING = re.compile(r"(\d+):(\d+):(\d+):(\d+)")


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """The loop arguments after defaults are applied. ``-1`` in ``max_epochs``/``max_steps`` means no limit."""

    max_epochs: int
    min_epochs: int
    max_steps: int
    min_steps: int
    max_time: datetime.timedelta | None
    limit_train_batches: int | float
    limit_val_batches: int | float
    limit_test_batches: int | float
    limit_predict_batches: int | float
    val_check_interval: int | float
    check_val_every_n_epoch: int | None
    num_sanity_val_steps: int  # -1: every validation batch
    log_every_n_steps: int
    accumulate_grad_batches: int
    gradient_clip_val: float | None
    gradient_clip_algorithm: str
    deterministic: bool | Literal["warn"] | None  # None: leave torch's switch as it is
    benchmark: bool | None
    enable_checkpointing: bool
    enable_progress_bar: bool
    enable_model_summary: bool
    fast_dev_run: int  # 0: off; n: run n batches of everything once
    default_root_dir: str
    use_distributed_sampler: bool
    sync_batchnorm: bool
    reload_dataloaders_every_n_epochs: int
    inference_mode: bool
    detect_anomaly: bool
    barebones: bool


def parse_config(
    *,
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
) -> TrainerConfig:
    """Checks every loop argument and applies the defaults; raises ``ConfigurationError`` naming a bad one."""
    flags = {
        name: _bool(name, value)
        for name, value in {
            "use_distributed_sampler": use_distributed_sampler,
            "sync_batchnorm": sync_batchnorm,
            "inference_mode": inference_mode,
            "detect_anomaly": detect_anomaly,
            "barebones": barebones,
        }.items()
    }
    dev_runs = _fast_dev_run(fast_dev_run)
    max_steps = _count("max_steps", max_steps, minimum=-1, hint="-1 for no limit")
    if max_epochs is None:
        max_epochs = DEFAULT_MAX_EPOCHS if max_steps == -1 else -1
    max_epochs = _count("max_epochs", max_epochs, minimum=-1, hint="-1 for no limit, None for the default")
    min_epochs = _count("min_epochs", 0 if min_epochs is None else min_epochs, minimum=0)
    min_steps = _count("min_steps", 0 if min_steps is None else min_steps, minimum=0)
    if max_epochs != -1 and min_epochs > max_epochs:
        raise ConfigurationError(f"min_epochs={min_epochs} is larger than max_epochs={max_epochs}. Valid: min <= max.")
    if max_steps != -1 and min_steps > max_steps:
        raise ConfigurationError(f"min_steps={min_steps} is larger than max_steps={max_steps}. Valid: min <= max.")
    limits = {
        name: _fraction_or_count(name, value, allow_zero=True)
        for name, value in {
            "limit_train_batches": limit_train_batches,
            "limit_val_batches": limit_val_batches,
            "limit_test_batches": limit_test_batches,
            "limit_predict_batches": limit_predict_batches,
        }.items()
    }
    interval = _fraction_or_count("val_check_interval", val_check_interval, allow_zero=False)
    if check_val_every_n_epoch is not None:
        check_val_every_n_epoch = _count("check_val_every_n_epoch", check_val_every_n_epoch, minimum=1, hint="or None")
    elif isinstance(interval, float):
        raise ConfigurationError(
            f"check_val_every_n_epoch=None needs an int val_check_interval (a count of training batches across "
            f"epochs), got val_check_interval={val_check_interval!r}. Valid: an int >= 1, or set "
            "check_val_every_n_epoch to an int."
        )
    sanity = _count("num_sanity_val_steps", 2 if num_sanity_val_steps is None else num_sanity_val_steps, minimum=-1)
    log_every = _count("log_every_n_steps", 50 if log_every_n_steps is None else log_every_n_steps, minimum=1)
    accumulate = _count("accumulate_grad_batches", accumulate_grad_batches, minimum=1)
    clip_val = _clip_val(gradient_clip_val)
    algorithm = _clip_algorithm(gradient_clip_algorithm)
    reload_every = _count("reload_dataloaders_every_n_epochs", reload_dataloaders_every_n_epochs, minimum=0)
    if deterministic is not None and not isinstance(deterministic, bool) and deterministic != "warn":
        raise ConfigurationError(
            f"deterministic={deterministic!r} is not valid. Valid: {choices([True, False, 'warn', None])}."
        )
    if benchmark is not None:
        benchmark = _bool("benchmark", benchmark)

    enables = {"enable_checkpointing": enable_checkpointing, "enable_progress_bar": enable_progress_bar}
    enables["enable_model_summary"] = enable_model_summary
    if flags["barebones"]:
        _check_barebones(enables, log_every_n_steps, flags["detect_anomaly"])
    resolved = {
        name: _bool(name, value) if value is not None else not flags["barebones"] for name, value in enables.items()
    }
    if dev_runs and enable_checkpointing is None:
        resolved["enable_checkpointing"] = False  # a smoke run writes no checkpoint unless asked to
    if dev_runs:
        max_epochs, max_steps, sanity, log_every = 1, dev_runs, 0, 1
        limits = dict.fromkeys(limits, dev_runs)
        interval, check_val_every_n_epoch = 1.0, 1
    return TrainerConfig(
        max_epochs=max_epochs,
        min_epochs=min_epochs,
        max_steps=max_steps,
        min_steps=min_steps,
        max_time=parse_max_time(max_time),
        val_check_interval=interval,
        check_val_every_n_epoch=check_val_every_n_epoch,
        num_sanity_val_steps=sanity,
        log_every_n_steps=log_every,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip_val,
        gradient_clip_algorithm=algorithm,
        deterministic="warn" if deterministic == "warn" else None if deterministic is None else bool(deterministic),
        benchmark=benchmark,
        fast_dev_run=dev_runs,
        default_root_dir=_root_dir(default_root_dir),
        reload_dataloaders_every_n_epochs=reload_every,
        limit_train_batches=limits["limit_train_batches"],
        limit_val_batches=limits["limit_val_batches"],
        limit_test_batches=limits["limit_test_batches"],
        limit_predict_batches=limits["limit_predict_batches"],
        enable_checkpointing=resolved["enable_checkpointing"],
        enable_progress_bar=resolved["enable_progress_bar"],
        enable_model_summary=resolved["enable_model_summary"],
        use_distributed_sampler=flags["use_distributed_sampler"],
        sync_batchnorm=flags["sync_batchnorm"],
        inference_mode=flags["inference_mode"],
        detect_anomaly=flags["detect_anomaly"],
        barebones=flags["barebones"],
    )


def parse_max_time(value: str | datetime.timedelta | Mapping[str, int] | None) -> datetime.timedelta | None:
    """``"DD:HH:MM:SS"``, a ``timedelta`` or ``{"days": .., "hours": .., "minutes": .., "seconds": ..}``."""
    valid = f"'DD:HH:MM:SS' (such as '00:12:00:00'), a datetime.timedelta, or a dict with keys {choices(_TIME_UNITS)}"
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        duration = value
    elif isinstance(value, str):
        match = _TIME_STRING.fullmatch(value.strip())
        if match is None:
            raise ConfigurationError(f"max_time={value!r} is not valid. Valid: {valid}.")
        days, hours, minutes, seconds = (int(part) for part in match.groups())
        duration = _timedelta(value, valid, days=days, hours=hours, minutes=minutes, seconds=seconds)
    elif isinstance(value, Mapping):
        unknown = [key for key in value if key not in _TIME_UNITS]
        if unknown or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
            raise ConfigurationError(f"max_time={dict(value)!r} is not valid. Valid: {valid}.")
        duration = _timedelta(dict(value), valid, **{str(k): float(v) for k, v in value.items()})
    else:
        raise ConfigurationError(f"max_time={value!r} is not valid. Valid: {valid}.")
    if duration.total_seconds() <= 0:
        raise ConfigurationError(f"max_time={value!r} is not a positive duration. Valid: {valid}.")
    return duration


def _timedelta(value: object, valid: str, **parts: float) -> datetime.timedelta:
    """``timedelta(**parts)``; NaN, infinities and durations past ``timedelta.max`` are refused, naming ``value``."""
    try:
        return datetime.timedelta(**parts)
    except (OverflowError, ValueError):  # ValueError: NaN; OverflowError: inf or more than 999999999 days
        raise ConfigurationError(
            f"max_time={value!r} is not valid: not a finite duration of at most {datetime.timedelta.max.days} days. "
            f"Valid: {valid}."
        ) from None


def parse_loggers(logger: Logger | Sequence[Logger] | bool | None, config: TrainerConfig) -> list[Logger]:
    """``None``/``True``: TensorBoard where installed, else CSV, under ``default_root_dir``; ``False``: none."""
    if logger is None or logger is True:
        if config.barebones or config.fast_dev_run:
            return []
        from torchloom.core.utils.imports import is_available

        if is_available("tensorboard"):
            from torchloom.core.loggers.tensorboard import TensorBoardLogger

            return [TensorBoardLogger(config.default_root_dir)]
        from torchloom.core.loggers.csv import CSVLogger

        return [CSVLogger(config.default_root_dir)]
    if logger is False:
        return []
    if config.barebones:
        raise ConfigurationError(f"barebones=True runs without loggers, got logger={logger!r}. Valid: None or False.")
    loggers = [logger] if isinstance(logger, Logger) else list(logger) if isinstance(logger, Sequence) else None
    if loggers is None or not all(isinstance(item, Logger) for item in loggers):
        raise ConfigurationError(
            f"logger={logger!r} is not valid. Valid: None (the default logger), False (none), a Logger such as "
            "CSVLogger/TensorBoardLogger from torchloom.core.loggers, or a list of them."
        )
    return [] if config.fast_dev_run else loggers


def parse_callbacks(callbacks: Callback | Sequence[Callback] | None) -> list[Callback]:
    if callbacks is None:
        return []
    items = (
        [callbacks] if isinstance(callbacks, Callback) else list(callbacks) if isinstance(callbacks, Sequence) else None
    )
    bad = [item for item in items or [] if not isinstance(item, Callback)]
    if items is None or bad:
        what = f" ({bad[0]!r} is not a Callback)" if bad else ""
        raise ConfigurationError(
            f"callbacks={callbacks!r} is not valid{what}. "
            "Valid: None, a Callback (torchloom.trainer.callbacks) or a list of them."
        )
    return items


# ---------------------------------------------------------------- single values


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name}={value!r} is not valid. Valid: {choices([True, False])}.")
    return value


def _count(name: str, value: object, minimum: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = f" ({hint})" if hint else ""
        raise ConfigurationError(f"{name}={value!r} is not valid. Valid: an int >= {minimum}{extra}.")
    return value


def _fraction_or_count(name: str, value: object, allow_zero: bool) -> int | float:
    """``None`` -> 1.0 (everything); a float is a fraction in [0, 1]; an int a count of batches."""
    low = "0.0" if allow_zero else "0.0 (exclusive)"
    valid = f"a float fraction between {low} and 1.0, or an int count of batches >= {0 if allow_zero else 1}"
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name}={value!r} is not valid. Valid: {valid}.")
    if isinstance(value, float):
        if not (0.0 <= value <= 1.0) or (value == 0.0 and not allow_zero):
            raise ConfigurationError(f"{name}={value!r} is not valid. Valid: {valid}.")
        return value
    if value < (0 if allow_zero else 1):
        raise ConfigurationError(f"{name}={value!r} is not valid. Valid: {valid}.")
    return value


def _fast_dev_run(value: object) -> int:
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, int) or value < 0:
        raise ConfigurationError(
            f"fast_dev_run={value!r} is not valid. Valid: True (one batch), False, or an int n >= 0 (n batches)."
        )
    return value


def _clip_val(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:  # NaN: not >= 0
        raise ConfigurationError(f"gradient_clip_val={value!r} is not valid. Valid: None, or a number >= 0.")
    return float(value) if value > 0 else None  # 0 means no clipping


def _clip_algorithm(value: object) -> str:
    if value is None:
        return "norm"
    if not isinstance(value, str) or value.lower() not in CLIP_ALGORITHMS:
        raise ConfigurationError(f"gradient_clip_algorithm={value!r} is not valid. Valid: {choices(CLIP_ALGORITHMS)}.")
    return value.lower()


def _root_dir(value: object) -> str:
    """``default_root_dir`` as a string: the current directory for ``None``, else a path (str or os.PathLike)."""
    if value is None:
        return os.getcwd()
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str) or not path or "\0" in path:
        raise ConfigurationError(
            f"default_root_dir={value!r} is not valid. Valid: None (the current directory), or a non-empty path "
            "(a str or os.PathLike such as pathlib.Path)."
        )
    return path


def _check_barebones(enables: dict[str, Any], log_every_n_steps: object, detect_anomaly: bool) -> None:
    clashes = [f"{name}=True" for name, value in enables.items() if value]
    if log_every_n_steps is not None:
        clashes.append(f"log_every_n_steps={log_every_n_steps!r}")
    if detect_anomaly:
        clashes.append("detect_anomaly=True")
    if clashes:
        raise ConfigurationError(
            f"barebones=True turns off checkpointing, the progress bar, the model summary, logging and anomaly "
            f"detection, but {', '.join(clashes)} asks for them. Valid: leave those arguments unset with barebones=True."
        )
