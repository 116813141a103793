"""Hyper-parameters: capturing a constructor's arguments, and keeping checkpoints loadable.

``save_hyperparameters()`` reads the arguments of the ``__init__`` call that built the object from
the call stack. It records the arguments of the *outermost* ``__init__`` of that object, i.e. the
call the user wrote (``MyModel(hidden=32, lr=0.1)``), also when a base class's ``__init__`` makes the
call: those are the arguments ``cls(**hparams)`` needs to rebuild the object from a checkpoint.
``*args`` cannot be passed back by name and is left out; ``**kwargs`` is merged in.

Checkpoints are loaded with ``torch.load(weights_only=True)``, which refuses anything that needs
arbitrary unpickling (a ``Path``, a class, an ``argparse.Namespace``, an ``nn.Module``...).
``check_hparams_serializable`` finds such a value before the checkpoint is written and names it, so
no checkpoint is written that cannot be read back. It checks the form a checkpoint stores
(``plain_hparams``: every ``AttributeDict`` turned into a ``dict``) by a real save/load round trip,
so it agrees with torch exactly, ``torch.serialization.add_safe_globals`` included.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import io
import types
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.utils.rank_zero import rank_zero_warn

__all__ = [
    "AttributeDict",
    "HyperparametersMixin",
    "capture_init_arguments",
    "check_hparams_serializable",
    "plain_hparams",
]


class AttributeDict(dict[str, Any]):
    """A dict whose keys are also attributes: ``hparams.lr`` is ``hparams["lr"]``."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(f"No hyper-parameter {key!r}; there are: {choices(self)}.") from err

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        try:
            del self[key]
        except KeyError as err:
            raise AttributeError(key) from err

    def __repr__(self) -> str:
        if not self:
            return "AttributeDict()"
        width = max(len(str(k)) for k in self)
        return "\n".join(f'"{k}":{" " * (width - len(str(k)) + 1)}{v!r}' for k, v in self.items())


def capture_init_arguments(obj: object, frame: types.FrameType | None) -> dict[str, Any]:
    """The arguments of the outermost ``__init__`` of ``obj`` found on the stack at or above ``frame``."""
    outermost: types.FrameType | None = None
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__init__" and code.co_argcount > 0 and frame.f_locals.get(code.co_varnames[0]) is obj:
            outermost = frame
        frame = frame.f_back
    if outermost is None:
        raise ConfigurationError(
            f"save_hyperparameters() found no __init__ of {type(obj).__name__} on the call stack: call it inside "
            "__init__, or pass the hyper-parameters as a dict."
        )
    info = inspect.getargvalues(outermost)
    values = {name: info.locals[name] for name in info.args[1:] if name in info.locals}
    if info.keywords is not None:
        values.update(info.locals.get(info.keywords) or {})
    return values


def plain_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``hparams`` as a checkpoint stores it: ``AttributeDict`` (anywhere inside) becomes ``dict``."""

    def convert(value: Any) -> Any:
        if isinstance(value, AttributeDict):
            return {k: convert(v) for k, v in value.items()}
        if type(value) in (list, tuple):
            return type(value)(convert(v) for v in value)
        if type(value) is dict:
            return {k: convert(v) for k, v in value.items()}
        return value

    return {k: convert(v) for k, v in hparams.items()}


def _copy(value: Any) -> Any:
    """A deep copy, except of modules (already in the weights; copying one can be costly) and uncopyable values."""
    if isinstance(value, torch.nn.Module):
        return value
    try:
        return copy.deepcopy(value)
    except Exception:
        return value


def _round_trips(value: Any) -> bool:
    """Whether ``torch.load(weights_only=True)`` reads back what ``torch.save`` wrote for ``value``."""
    if isinstance(value, torch.nn.Module):  # never loadable, and saving a large one to find out is costly
        return False
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:  # pickling errors, UnpicklingError, anything torch raises on a bad value
        return False
    return True


def _children(value: Any) -> Iterable[tuple[str, Any]]:
    """(path suffix, child) of a container, keys included (a dict key must load too)."""
    if isinstance(value, Mapping):
        for key, child in value.items():
            yield f"<key {key!r}>", key
            yield f"[{key!r}]", child
    elif isinstance(value, (list, tuple, set, frozenset)):
        for index, child in enumerate(value):
            yield f"[{index}]", child


def _first_bad(path: str, value: Any) -> tuple[str, Any]:
    """The innermost part of ``value`` (known not to round-trip) that does not round-trip on its own."""
    for suffix, child in _children(value):
        if not _round_trips(child):
            return _first_bad(path + suffix, child)
    return path, value  # every part loads: the container type itself is what torch refuses


def check_hparams_serializable(hparams: Mapping[str, Any]) -> None:
    """Raises ``ConfigurationError`` naming the key and type of a value ``torch.load(weights_only=True)`` refuses."""
    plain = plain_hparams(hparams)
    if _round_trips(plain):
        return
    for key, value in plain.items():
        if not _round_trips(key) or not _round_trips(value):
            path, bad = _first_bad(f"[{key!r}]", value) if _round_trips(key) else (f"<key {key!r}>", key)
            raise ConfigurationError(
                f"The hyper-parameter {key!r} cannot be stored in a checkpoint: its value at hparams{path} has type "
                f"{type(bad).__module__}.{type(bad).__qualname__}, which torch.load(weights_only=True) refuses to "
                "load. Store plain values instead (None, bool, int, float, str, tensors, torch.dtype/device, and "
                f"lists/tuples/dicts of them; e.g. str(path) for a path), or leave it out with "
                f"save_hyperparameters(ignore=[{key!r}])."
            )
    raise ConfigurationError("The hyper-parameters cannot be stored in a checkpoint loaded with weights_only=True.")


class HyperparametersMixin:
    """``save_hyperparameters``, ``hparams`` and ``hparams_initial`` for modules and data modules."""

    def save_hyperparameters(
        self, *args: Any, ignore: str | Iterable[str] | None = None, frame: types.FrameType | None = None
    ) -> None:
        """Records hyper-parameters in ``self.hparams`` (saved in checkpoints).

        With no ``args``: every argument of the ``__init__`` that built this object. ``args`` may name
        some of them (strings) or give the hyper-parameters directly (a dict or ``argparse.Namespace``).
        ``ignore`` leaves out the named arguments (e.g. an ``nn.Module`` passed in, already in the weights).
        """
        names = [a for a in args if isinstance(a, str)]
        given = [a for a in args if not isinstance(a, str)]
        hparams: dict[str, Any] = {}
        for item in given:
            if isinstance(item, argparse.Namespace):
                hparams.update(vars(item))
            elif isinstance(item, Mapping):
                hparams.update(item)
            else:
                raise ConfigurationError(
                    f"save_hyperparameters() got {item!r} of type {type(item).__name__}; pass argument names "
                    "(str), a dict or an argparse.Namespace."
                )
        if names or not given:
            init_args = capture_init_arguments(self, frame or inspect.currentframe())
            missing = [n for n in names if n not in init_args]
            if missing:
                raise ConfigurationError(
                    f"save_hyperparameters() got {missing}, which are not arguments of "
                    f"{type(self).__name__}.__init__. Valid: {choices(init_args)}."
                )
            hparams.update({n: init_args[n] for n in names} if names else init_args)
        ignored = {ignore} if isinstance(ignore, str) else set(ignore or ())
        hparams = {k: v for k, v in hparams.items() if k not in ignored}
        self._set_hparams(hparams)

    def _set_hparams(self, hparams: Mapping[str, Any]) -> None:
        for key, value in hparams.items():
            if not _round_trips(value):
                rank_zero_warn(
                    f"The hyper-parameter {key!r} ({type(value).__name__}) cannot be loaded with weights_only=True, "
                    f"so saving a checkpoint will fail. Pass save_hyperparameters(ignore=[{key!r}]) if it is not "
                    "needed to rebuild the object (an nn.Module given to __init__ is saved in the weights anyway)."
                )
        self.__dict__["_hparams"] = AttributeDict(hparams)
        self.__dict__["_hparams_initial"] = AttributeDict({k: _copy(v) for k, v in hparams.items()})

    @property
    def hparams(self) -> AttributeDict:
        """The hyper-parameters recorded by ``save_hyperparameters`` (editable)."""
        if "_hparams" not in self.__dict__:
            self.__dict__["_hparams"] = AttributeDict()
        hparams: AttributeDict = self.__dict__["_hparams"]
        return hparams

    @property
    def hparams_initial(self) -> AttributeDict:
        """A copy of the hyper-parameters as ``save_hyperparameters`` recorded them, before any edit."""
        return AttributeDict({k: _copy(v) for k, v in self.__dict__.get("_hparams_initial", {}).items()})
