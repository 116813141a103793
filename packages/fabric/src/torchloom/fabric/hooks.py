"""Calling a named hook on the callbacks that define it (``fabric.call``)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

__all__ = ["call_hook"]


def call_hook(callbacks: Iterable[Any], name: str, *args: Any, **kwargs: Any) -> None:
    """Calls ``callback.<name>(*args, **kwargs)`` on each callback that has such a method.

    A callback receives only the keyword arguments its signature names (all of them if it takes
    ``**kwargs``), so a hook may ignore what it does not need.
    """
    for callback in callbacks:
        method = getattr(callback, name, None)
        if callable(method):
            method(*args, **_accepted(method, kwargs))


def _accepted(method: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    if not kwargs:
        return kwargs
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): pass everything
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return kwargs
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {key: value for key, value in kwargs.items() if key in names}
