"""Progress marks: the strategy calls every rank makes the same number of times, counted as they happen.

``mark_calls`` wraps a strategy class's ``MARKED_CALLS``; each call then updates ``progress`` (a counter, the
call's name, whether the main thread is inside it, when it last moved), in memory only (~1 µs).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["MARKED_CALLS", "Progress", "mark_calls", "progress"]

# the strategy calls that count as progress: every rank makes each of them the same number of times
MARKED_CALLS = (
    "setup_module",
    "backward",
    "optimizer_step",
    "all_reduce",
    "all_gather",
    "broadcast",
    "barrier",
    "reduce_boolean_decision",
    "save_checkpoint",
    "load_checkpoint",
)

F = TypeVar("F", bound=Callable[..., Any])


class Progress:
    """Where this process's main thread is: written by it on every marked call, read by the watchdog thread."""

    __slots__ = ("calls", "last", "moved", "stack")

    def __init__(self) -> None:
        self.calls = 0
        self.last: str | None = None  # the call entered most recently
        self.stack: list[str] = []  # the marked calls it is inside, innermost last
        self.moved = time.monotonic()  # when it last entered or left one

    def snapshot(self) -> tuple[int, str | None, bool, float]:
        """(calls, the innermost call it is in or else the last it entered, whether inside one, when it last moved)."""
        inner = self.stack[-1:]  # one read: the main thread may pop meanwhile
        return self.calls, inner[0] if inner else self.last, bool(inner), self.moved


progress = Progress()  # one per process: the watchdog watches the process, whichever strategy made the calls


def _marked(label: str, method: F) -> F:
    named = label == "barrier"  # barrier(name): the name says which sync point ('prepare_data', ...)

    @functools.wraps(method)
    def marked(*args: Any, **kwargs: Any) -> Any:
        here = label
        if named and (name := kwargs.get("name", args[1] if len(args) > 1 else None)):
            here = f"{label}({name!r})"
        progress.calls += 1
        progress.last = here
        progress.stack.append(here)
        progress.moved = time.monotonic()
        try:
            return method(*args, **kwargs)
        finally:
            progress.stack.pop()
            progress.moved = time.monotonic()

    marked.__torchloom_marked__ = True  # type: ignore[attr-defined]
    return marked  # type: ignore[return-value]


def mark_calls(cls: type, inherited: bool = False) -> None:
    """Makes ``cls``'s ``MARKED_CALLS`` record progress: those it defines, and with ``inherited`` those it inherits."""
    for name in MARKED_CALLS:
        method = getattr(cls, name, None) if inherited else cls.__dict__.get(name)
        if callable(method) and not getattr(method, "__torchloom_marked__", False):
            setattr(cls, name, _marked(name, method))
