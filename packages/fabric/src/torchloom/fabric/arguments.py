"""The objects users pass to Fabric's methods: checked, and unwrapped into what the strategy expects."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer

from torchloom.core.errors import ConfigurationError
from torchloom.core.loggers.logger import Logger
from torchloom.core.strategies.strategy import Strategy
from torchloom.fabric import checks
from torchloom.fabric.checks import FabricUsageError
from torchloom.fabric.wrappers import FabricModule, FabricOptimizer

__all__ = [
    "as_list",
    "check_filter",
    "check_loggers",
    "check_module",
    "check_optimizers",
    "check_state",
    "load_raw_state",
    "positive",
    "unwrap_module",
    "unwrap_optimizer",
    "unwrap_state",
    "update_plain_values",
]


def as_list(obj: Any) -> list[Any]:
    """``None`` -> ``[]``; a list or tuple -> a list of its items; anything else -> ``[obj]``."""
    if obj is None:
        return []
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]


def check_filter(filter: Any, state: dict[str, Any]) -> dict[str, Callable[[str, Any], bool]] | None:
    """``save(filter=...)``: names of ``state`` mapped to ``keep(key, value)`` callables."""
    if filter is None:
        return None
    if not isinstance(filter, Mapping) or not all(callable(f) for f in filter.values()):
        raise ConfigurationError(f"save(filter={filter!r}): expected a dict of names to callables.")
    unknown = sorted(set(filter) - set(state))
    if unknown:
        raise ConfigurationError(f"save(filter=...) names {unknown}, which are not in state {sorted(state)}.")
    return dict(filter)


def check_loggers(loggers: Any) -> list[Logger]:
    if loggers is None or isinstance(loggers, (Logger, list, tuple)):
        items = as_list(loggers)
    elif isinstance(loggers, Iterable) and not isinstance(loggers, (str, bytes, Mapping)):
        items = list(loggers)
    else:
        raise ConfigurationError(
            f"loggers={loggers!r} is not valid. Valid: None, a torchloom Logger (CSVLogger, TensorBoardLogger or "
            "another subclass of torchloom.core.loggers.Logger), or a list of them."
        )
    for logger in items:
        if not isinstance(logger, Logger):
            raise ConfigurationError(
                f"loggers got {logger!r}, which is not a torchloom Logger. Valid: CSVLogger, TensorBoardLogger "
                "or another subclass of torchloom.core.loggers.Logger."
            )
    return items


def check_module(module: Any, owner: str) -> None:
    """Refuses what is not a module, or a module set up already (a ``FabricModule``, or set up by ``owner``)."""
    if isinstance(module, FabricModule):
        raise FabricUsageError("This module is a FabricModule: it was set up already. Set up each module once.")
    if not isinstance(module, nn.Module):
        raise ConfigurationError(f"setup expects a torch.nn.Module, got {type(module).__name__}.")
    if checks.set_up_by(module) == owner:
        raise FabricUsageError(
            f"This {type(module).__name__} was set up by this Fabric already; use the FabricModule that "
            "setup returned instead of setting the module up again."
        )


def check_optimizers(optimizers: Sequence[Any]) -> None:
    for optimizer in optimizers:
        if isinstance(optimizer, FabricOptimizer):
            raise FabricUsageError("This optimizer is a FabricOptimizer: it was set up already. Set it up once.")
        if not isinstance(optimizer, Optimizer):
            raise ConfigurationError(f"Expected torch.optim.Optimizer objects, got {type(optimizer).__name__}.")


def check_state(state: Any, method: str) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise ConfigurationError(f"{method}(state=...) must be a dict of names to objects, got {type(state).__name__}.")
    return state


def positive(name: str, value: float) -> float:
    """``value`` as a float; a clipping threshold must be a number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"clip_gradients({name}={value!r}): expected a number > 0.")
    return float(value)


def unwrap_module(module: Any, where: str) -> nn.Module:
    """The strategy's module for a ``FabricModule``; a plain module as it is."""
    if isinstance(module, FabricModule):
        return module.forward_module
    if isinstance(module, nn.Module):
        return module
    raise ConfigurationError(
        f"{where} expects the FabricModule that fabric.setup returned, got {type(module).__name__}."
    )


def unwrap_optimizer(optimizer: Any, where: str) -> Optimizer:
    """The wrapped optimizer of a ``FabricOptimizer``; a plain optimizer as it is."""
    if isinstance(optimizer, FabricOptimizer):
        return optimizer.optimizer
    if isinstance(optimizer, Optimizer):
        return optimizer
    raise ConfigurationError(
        f"{where} expects the FabricOptimizer that fabric.setup returned, got {type(optimizer).__name__}."
    )


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, FabricModule):
        return obj.forward_module
    if isinstance(obj, FabricOptimizer):
        return obj.optimizer
    return obj


def unwrap_state(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state`` with wrappers replaced by the objects the strategy saves and loads."""
    return {key: _unwrap(value) for key, value in state.items()}


def update_plain_values(state: dict[str, Any], loaded: dict[str, Any]) -> None:
    """Copies the plain values a load replaced in ``loaded`` (the unwrapped copy) back into the user's ``state``."""
    for key, value in state.items():
        if not isinstance(value, (FabricModule, FabricOptimizer)):
            state[key] = loaded[key]


def load_raw_state(strategy: Strategy, path: Any, obj: Any, strict: bool, weights_only: bool) -> None:
    """Loads the state dict saved at ``path`` into a module, an optimizer or anything with ``load_state_dict``."""
    state_dict = strategy.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
    if isinstance(obj, nn.Module):
        strategy.load_module_state_dict(unwrap_module(obj, "load_raw"), state_dict, strict=strict)
    elif isinstance(obj, FabricOptimizer):
        obj.load_state_dict(state_dict)  # with the module it knows (sharded strategies need it)
    elif isinstance(obj, Optimizer):
        strategy.load_optimizer_state(obj, state_dict)
    elif callable(getattr(obj, "load_state_dict", None)):
        obj.load_state_dict(state_dict)
    else:
        raise ConfigurationError(
            f"load_raw(obj={type(obj).__name__}): expected a module, an optimizer or an object with load_state_dict."
        )
