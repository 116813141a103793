"""The project's exception types. Every user-facing rejection raises one of these."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "CheckpointError",
    "ConfigurationError",
    "MissingDependencyError",
    "TorchloomError",
    "WorkerFailedError",
    "choices",
]


class TorchloomError(Exception):
    """Base class of every error torchloom raises on purpose."""


class ConfigurationError(TorchloomError, ValueError):
    """An argument, or a combination of arguments, that torchloom cannot run with.

    The message always names the bad value and, where there is a closed set, the valid choices.
    """


class CheckpointError(ConfigurationError):
    """A checkpoint that torchloom refuses to load: truncated or corrupt, not a checkpoint at all, a pickle that
    would run code when opened, an incomplete checkpoint directory, or one written by a newer torchloom.

    The message names the path, says what is wrong with it and what to do. Nothing in the file was executed.
    A subclass of ``ConfigurationError`` (the path is an argument torchloom cannot run with), so code that
    caught that for a bad checkpoint keeps working. A path that does not exist is ``FileNotFoundError``.
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
