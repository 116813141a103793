"""The project's exception types. Every user-facing rejection raises one of these."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ConfigurationError", "MissingDependencyError", "TorchloomError", "WorkerFailedError", "choices"]


class TorchloomError(Exception):
    """Base class of every error torchloom raises on purpose."""


class ConfigurationError(TorchloomError, ValueError):
    """An argument, or a combination of arguments, that torchloom cannot run with.

    The message always names the bad value and, where there is a closed set, the valid choices.
    """


class MissingDependencyError(TorchloomError, ModuleNotFoundError):
    """An optional package is needed for the requested feature; the message says what to install."""


class WorkerFailedError(TorchloomError, RuntimeError):
    """A worker process of a launcher failed; the message names its rank and shows its error."""

    def __init__(self, message: str, *, rank: int | None = None, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.exitcode = exitcode


def choices(values: Iterable[object]) -> str:
    """Formats a closed set of valid values for an error message: ``'a', 'b', 'c'``."""
    return ", ".join(repr(v) for v in values)
