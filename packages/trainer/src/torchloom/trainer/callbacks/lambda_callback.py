"""LambdaCallback: a callback made of plain functions, one per hook name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torchloom.core.errors import ConfigurationError, choices
from torchloom.trainer.callbacks.callback import Callback

__all__ = ["HOOK_NAMES", "LambdaCallback"]

# every hook of the base: its public methods except the checkpoint-state protocol
HOOK_NAMES = tuple(
    sorted(
        name
        for name, value in vars(Callback).items()
        if callable(value) and not name.startswith("_") and name not in ("state_dict", "load_state_dict")
    )
)


class LambdaCallback(Callback):
    """``LambdaCallback(on_train_epoch_end=lambda trainer, module: ...)``: each keyword names a hook of
    :class:`Callback` and its function receives the same arguments as that hook."""

    def __init__(self, **hooks: Callable[..., Any]) -> None:
        for name, function in hooks.items():
            if name not in HOOK_NAMES:
                raise ConfigurationError(
                    f"LambdaCallback got {name!r}, which is not a callback hook; valid hooks: {choices(HOOK_NAMES)}."
                )
            if not callable(function):
                raise ConfigurationError(f"LambdaCallback({name}={function!r}): the value must be callable.")
            setattr(self, name, function)  # an instance attribute shadows the no-op method of the base
        self.hooks = dict(hooks)
