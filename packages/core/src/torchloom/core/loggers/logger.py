"""The Logger contract shared by Fabric and the Trainer: rank-zero only, versioned run folders.

A logger is often built in the launching process before any worker exists, so the rank is read at
call time, never at construction. Every public method is a no-op on a non-zero global rank, and
only rank 0 ever creates folders or files.
"""

from __future__ import annotations

import argparse
import atexit
import operator
import os
import re
import tempfile
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeAlias

import torch

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.utils import rank_zero

__all__ = ["FINALIZE_STATUSES", "HParamValue", "Logger", "flatten_hyperparams", "scalar_metrics"]

HParamValue: TypeAlias = str | int | float | bool | None
FINALIZE_STATUSES = ("success", "failed", "aborted")
_VERSION_FOLDER = re.compile(r"version_(\d+)")


class Logger(ABC):
    """Writes metrics and hyperparameters of one run into ``root_dir/name/version``.

    ``version=None`` picks the next free ``version_N`` under ``root_dir/name`` the first time the
    version is needed. That scan only reads the file system; rank 0 alone creates the folder. On
    other ranks the version is a best guess: pass an explicit version where every rank must agree.

    ``step=None`` in :meth:`log_metrics` uses an internal counter: one past the last step logged.
    """

    def __init__(
        self, root_dir: str | os.PathLike[str], name: str = "torchloom_logs", version: int | str | None = None
    ) -> None:
        if not isinstance(name, str):
            raise ConfigurationError(f"Logger name must be a string (it names a folder), got {name!r}.")
        if version is not None and not _valid_version(version):
            raise ConfigurationError(
                f"Logger version must be None (next free version_N), an int >= 0 or a non-empty folder name, "
                f"got {version!r}."
            )
        self._root_dir = os.fspath(root_dir)
        self._name = name
        self._version = version
        self._next_step = 0
        self._hyperparams: dict[str, HParamValue] = {}
        self._hparam_metric_names: list[str] = []
        self._exit_flush_registered = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def root_dir(self) -> str:
        return self._root_dir

    @property
    def version(self) -> int | str:
        if self._version is None:
            self._version = _next_free_version(Path(self._root_dir, self._name))
        return self._version

    @property
    def log_dir(self) -> str:
        """Where this run's files go: ``root_dir/name/version_N`` or ``root_dir/name/<version string>``."""
        version = self.version
        folder = version if isinstance(version, str) else f"version_{version}"
        return os.path.join(self._root_dir, self._name, folder)

    @property
    def hyperparams(self) -> dict[str, HParamValue]:
        """Every hyperparameter logged so far (flattened), on rank 0; empty elsewhere."""
        return dict(self._hyperparams)

    def log_metrics(self, metrics: Mapping[str, float | torch.Tensor], step: int | None = None) -> None:
        """Records scalar ``metrics`` at ``step`` (default: one past the last step logged)."""
        if not _on_rank_zero():
            return
        values = scalar_metrics(metrics)
        if not values:
            return
        at = self._next_step if step is None else _as_step(step)
        self._register_exit_flush()
        self._write_metrics(values, at)
        self._next_step = at + 1

    def log_hyperparams(
        self,
        params: Mapping[str, Any] | argparse.Namespace,
        metrics: Mapping[str, float | torch.Tensor] | None = None,
    ) -> None:
        """Records hyperparameters; later calls add to (and overwrite keys of) earlier ones.

        Nested mappings are flattened with ``/`` keys. Values that are not str, int, float, bool
        or None are stored as their ``repr``. ``metrics`` are shown next to the hyperparameters
        where the logger has such a view (TensorBoard's HPARAMS tab) and are also logged as
        ordinary metrics at the last step logged.
        """
        if not _on_rank_zero():
            return
        flat = flatten_hyperparams(params)
        values = {} if metrics is None else scalar_metrics(metrics)
        self._hyperparams.update(flat)
        self._hparam_metric_names += [key for key in values if key not in self._hparam_metric_names]
        self._register_exit_flush()
        self._write_hyperparams(dict(self._hyperparams), list(self._hparam_metric_names))
        if values:
            self._write_metrics(values, max(self._next_step - 1, 0))

    def save(self) -> None:
        """Makes everything logged so far durable on disk."""
        if _on_rank_zero():
            self._save()

    def finalize(self, status: str = "success") -> None:
        """Ends the run: flushes and releases files. ``status`` is one of :data:`FINALIZE_STATUSES`."""
        if status not in FINALIZE_STATUSES:
            raise ConfigurationError(f"Unknown run status {status!r}; expected one of {choices(FINALIZE_STATUSES)}.")
        if _on_rank_zero():
            self._finalize(status)

    @abstractmethod
    def _write_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Rank 0 only; ``metrics`` are already python floats."""

    @abstractmethod
    def _write_hyperparams(self, params: dict[str, HParamValue], metric_names: list[str]) -> None:
        """Rank 0 only; ``params`` is every hyperparameter logged so far, flattened."""

    @abstractmethod
    def _save(self) -> None: ...

    def _finalize(self, status: str) -> None:
        self._save()

    def _register_exit_flush(self) -> None:
        # A script that never calls finalize() still gets its buffered rows written at exit.
        if not self._exit_flush_registered:
            atexit.register(_save_if_alive, weakref.ref(self))
            self._exit_flush_registered = True

    def __getstate__(self) -> dict[str, Any]:
        # Copies sent to worker processes register their own exit hook.
        state = self.__dict__.copy()
        state["_exit_flush_registered"] = False
        return state


def flatten_hyperparams(params: Mapping[str, Any] | argparse.Namespace, prefix: str = "") -> dict[str, HParamValue]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim/lr": 0.1}``; non-simple values become their ``repr``."""
    if isinstance(params, argparse.Namespace):
        params = vars(params)
    if not isinstance(params, Mapping):
        raise ConfigurationError(
            f"Hyperparameters must be a mapping or an argparse.Namespace, got {type(params).__name__}."
        )
    flat: dict[str, HParamValue] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, (Mapping, argparse.Namespace)):
            flat.update(flatten_hyperparams(value, prefix=f"{name}/"))
        elif value is None or isinstance(value, (str, int, float, bool)):
            flat[name] = value
        else:
            flat[name] = repr(value)
    return flat


def scalar_metrics(metrics: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """Metric values as python floats: one ``.item()`` per tensor; anything not a single number is an error."""
    values: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise ConfigurationError(f"Metric names must be strings, got {key!r}.")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ConfigurationError(
                    f"Metric {key!r} is a tensor of shape {tuple(value.shape)}; only single-element tensors "
                    "can be logged. Reduce it first (for example with .mean())."
                )
            values[key] = float(value.item())
            continue
        try:
            values[key] = float(value)
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"Metric {key!r} must be a number or a one-element tensor, got {value!r}."
            ) from None
    return values


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` to a temp file next to ``path`` and renames it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _on_rank_zero() -> bool:
    return rank_zero.global_rank() == 0


def _as_step(step: Any) -> int:
    try:
        value = operator.index(step)
    except TypeError:
        raise ConfigurationError(f"step must be an int >= 0, got {step!r}.") from None
    if value < 0:
        raise ConfigurationError(f"step must be an int >= 0, got {step!r}.")
    return value


def _valid_version(version: object) -> bool:
    if isinstance(version, bool):
        return False
    if isinstance(version, int):
        return version >= 0
    return isinstance(version, str) and bool(version) and os.sep not in version


def _next_free_version(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    taken = [int(m.group(1)) for p in folder.iterdir() if p.is_dir() and (m := _VERSION_FOLDER.fullmatch(p.name))]
    return max(taken, default=-1) + 1


def _save_if_alive(ref: weakref.ReferenceType[Logger]) -> None:
    logger = ref()
    if logger is not None:
        logger.save()
