"""Rank-zero-only printing and warnings, keyed on the process's global rank."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["rank_zero_info", "rank_zero_only", "rank_zero_warn", "set_global_rank"]

F = TypeVar("F", bound=Callable[..., Any])


def _rank_from_env() -> int:
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


_rank = _rank_from_env()


def set_global_rank(rank: int) -> None:
    """Called by strategies once the process knows its rank."""
    global _rank
    _rank = rank


def global_rank() -> int:
    return _rank


def rank_zero_only(fn: F) -> F:
    """Runs ``fn`` on global rank 0 only; elsewhere the call returns ``None``."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if _rank == 0 else None

    return wrapped  # type: ignore[return-value]


@rank_zero_only
def rank_zero_warn(message: str, category: type[Warning] = UserWarning, stacklevel: int = 3) -> None:
    warnings.warn(message, category, stacklevel=stacklevel)


@rank_zero_only
def rank_zero_info(message: str) -> None:
    print(message, flush=True)
