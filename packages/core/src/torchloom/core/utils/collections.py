"""Mapping a function over nested collections (dicts, lists, tuples, named tuples, dataclasses)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["apply_to_collection"]


def apply_to_collection(
    data: Any, dtype: type | tuple[type, ...], function: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """Returns ``data`` with ``function(x, *args, **kwargs)`` applied to every ``x`` of ``dtype``.

    Containers are rebuilt with the same type; anything else is returned unchanged.
    """
    if isinstance(data, dtype):
        return function(data, *args, **kwargs)
    kind = type(data)
    if kind is list or kind is tuple:  # the usual batch, without the slower abstract-class checks below
        values = [apply_to_collection(v, dtype, function, *args, **kwargs) for v in data]
        return values if kind is list else tuple(values)
    if isinstance(data, Mapping):
        items = {k: apply_to_collection(v, dtype, function, *args, **kwargs) for k, v in data.items()}
        try:
            return type(data)(items)  # type: ignore[call-arg]
        except TypeError:  # mappings whose constructor takes other arguments (e.g. defaultdict)
            return items
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # named tuple
        return type(data)(*(apply_to_collection(v, dtype, function, *args, **kwargs) for v in data))
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        values = [apply_to_collection(v, dtype, function, *args, **kwargs) for v in data]
        return values if isinstance(data, list) else type(data)(values)  # type: ignore[call-arg]
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        changes = {
            f.name: apply_to_collection(getattr(data, f.name), dtype, function, *args, **kwargs)
            for f in dataclasses.fields(data)
            if f.init
        }
        return dataclasses.replace(data, **changes)
    return data
