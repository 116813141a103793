"""Catching wrong use of Fabric's wrappers: the errors, and the bookkeeping behind them.

Three rules need state that outlives a single call:

- **Optimizers step through Fabric.** An optimizer over the parameters of a set-up module must be the
  ``FabricOptimizer`` that ``fabric.setup`` returned: stepping the raw one (never set up, or the
  object inside a ``FabricOptimizer``) would skip the precision's grad scaler and the strategy's step.
  A process-wide optimizer step pre-hook checks each step against the parameters and optimizers set
  up in this process. Optimizers over other parameters (a plain PyTorch model next to Fabric) are left alone.
- **Optimizers see the set-up parameters.** A strategy may replace a module's parameters when it sets it
  up (FSDP and tensor parallelism make new DTensor parameters). An optimizer built before
  ``fabric.setup_module`` still holds the old ones, and stepping it would train tensors the model no
  longer uses: ``fabric.setup_optimizers`` and the step check refuse it. Nothing here asks which
  strategy did it; the parameters a set-up module no longer has are recorded as replaced.
- **Backward goes through Fabric** where the strategy or the precision customises it (``16-mixed``
  scales the loss). ``FabricModule`` puts a gradient hook on its outputs that fails unless
  ``fabric.backward`` is running.

The bookkeeping is per process (module globals, weak references), so nothing here has to pickle.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Generator, Iterable
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from torchloom.core.errors import TorchloomError
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies.strategy import Strategy

__all__ = [
    "FabricUsageError",
    "check_not_replaced",
    "customizes_backward",
    "fabric_backward",
    "guard_backward",
    "module_holding",
    "register_module",
    "register_optimizer",
    "register_params",
    "register_replaced",
    "set_up_by",
    "stepping_through_fabric",
]


class FabricUsageError(TorchloomError, RuntimeError):
    """A Fabric object used in a way that cannot work (wrong order, bypassed wrapper, other process)."""


# id(tensor) -> (weak reference, owner token): parameters of modules set up in this process
_PARAMS: dict[int, tuple[weakref.ref[Tensor], str]] = {}
# id(optimizer) -> weak reference: raw optimizers wrapped in a FabricOptimizer in this process
_OPTIMIZERS: dict[int, weakref.ref[Optimizer]] = {}
# id(tensor) -> weak reference: parameters that a module's setup replaced with new ones
_REPLACED: dict[int, weakref.ref[Tensor]] = {}
# id(module) -> weak reference: the modules the strategies returned in this process (to pair optimizers with)
_MODULES: dict[int, weakref.ref[nn.Module]] = {}
_state = {"stepping": 0, "backward": 0, "hook_installed": False}


def _forget(table: dict[int, Any], key: int) -> Any:
    return lambda _ref: table.pop(key, None)


def register_params(params: Iterable[Tensor], owner: str) -> None:
    """Records ``params`` as belonging to a module set up by the Fabric whose token is ``owner``."""
    _install_step_check()
    for param in params:
        key = id(param)
        _PARAMS[key] = (weakref.ref(param, _forget(_PARAMS, key)), owner)


def register_replaced(before: Iterable[Tensor], after: Iterable[Tensor]) -> None:
    """Records the parameters of ``before`` (a module's, ahead of its setup) that ``after`` no longer holds."""
    current = {id(p) for p in after}
    for param in before:
        key = id(param)
        if key not in current:
            _REPLACED[key] = weakref.ref(param, _forget(_REPLACED, key))


def register_module(module: nn.Module) -> None:
    """Records a module a strategy set up, so that optimizers set up later can be paired with it."""
    key = id(module)
    _MODULES[key] = weakref.ref(module, _forget(_MODULES, key))


def module_holding(optimizer: Optimizer) -> nn.Module | None:
    """The set-up module that holds all of ``optimizer``'s parameters, or ``None``."""
    wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for ref in list(_MODULES.values()):
        module = ref()
        if module is not None and wanted <= {id(p) for p in module.parameters()}:
            return module
    return None


def _replaced(optimizer: Optimizer) -> list[Tensor]:
    params: Iterable[Tensor] = (p for group in optimizer.param_groups for p in group["params"])
    return [p for p in params if (ref := _REPLACED.get(id(p))) is not None and ref() is p]


def check_not_replaced(optimizer: Optimizer, strategy: str) -> None:
    """Refuses an optimizer holding parameters that a module's setup replaced (built before ``setup_module``)."""
    replaced = _replaced(optimizer)
    if replaced:
        raise FabricUsageError(
            f"The {type(optimizer).__name__} holds {len(replaced)} parameter(s) that {strategy} replaced when it set "
            "the module up (it shards them into new tensors), so stepping it would not train the model. Build the "
            "optimizer after setup_module, from the set-up module: `model = fabric.setup_module(model); optimizer = "
            "fabric.setup_optimizers(Adam(model.parameters()))`, or pass both to `model, optimizer = "
            "fabric.setup(model, optimizer)`, which points the optimizer at the new parameters."
        )


def register_optimizer(optimizer: Optimizer) -> None:
    _install_step_check()
    key = id(optimizer)
    _OPTIMIZERS[key] = weakref.ref(optimizer, _forget(_OPTIMIZERS, key))


def set_up_by(module: nn.Module) -> str | None:
    """The owner token of the Fabric that set up ``module`` in this process, or ``None``."""
    for param in module.parameters():
        owner = _owner(param)
        if owner is not None:
            return owner
    return None


def _owner(param: Tensor) -> str | None:
    entry = _PARAMS.get(id(param))
    return entry[1] if entry is not None and entry[0]() is param else None


def _is_registered_optimizer(optimizer: Optimizer) -> bool:
    ref = _OPTIMIZERS.get(id(optimizer))
    return ref is not None and ref() is optimizer


@contextlib.contextmanager
def stepping_through_fabric() -> Generator[None, None, None]:
    """Marks optimizer steps made inside as coming from ``FabricOptimizer.step``."""
    _state["stepping"] += 1
    try:
        yield
    finally:
        _state["stepping"] -= 1


def _check_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    if _state["stepping"] or not (_PARAMS or _OPTIMIZERS):
        return
    check_not_replaced(optimizer, "the strategy")
    if _is_registered_optimizer(optimizer):
        raise FabricUsageError(
            f"{type(optimizer).__name__}.step() was called on the raw optimizer that a FabricOptimizer wraps. "
            "Step the optimizer that fabric.setup returned (it runs the precision's and the strategy's step)."
        )
    params: Iterable[Tensor] = (p for group in optimizer.param_groups for p in group["params"])
    if any(_owner(p) is not None for p in params):
        raise FabricUsageError(
            f"{type(optimizer).__name__}.step() was called on an optimizer that was not set up, over the "
            "parameters of a module that was. Pass it to Fabric: `model, optimizer = fabric.setup(model, "
            "optimizer)` (or `fabric.setup_optimizers(optimizer)`), and step the optimizer it returns."
        )


def _install_step_check() -> None:
    if not _state["hook_installed"]:
        register_optimizer_step_pre_hook(_check_step)
        _state["hook_installed"] = True


# ------------------------------------------------------------------ backward


def customizes_backward(strategy: Strategy, precision: Precision) -> bool:
    """Whether ``loss.backward()`` would differ from ``strategy.backward(loss, module)``."""

    def overrides(obj: object, base: type, name: str) -> bool:
        return getattr(type(obj), name) is not getattr(base, name)

    return overrides(strategy, Strategy, "backward") or any(
        overrides(precision, Precision, name) for name in ("pre_backward", "backward", "post_backward")
    )


@contextlib.contextmanager
def fabric_backward() -> Generator[None, None, None]:
    _state["backward"] += 1
    try:
        yield
    finally:
        _state["backward"] -= 1


def _backward_guard(grad: Tensor) -> None:
    if not _state["backward"]:
        raise FabricUsageError(
            "loss.backward() was called on an output of a FabricModule, but with this strategy/precision the "
            "backward pass must go through Fabric (it scales the loss, for example). Call fabric.backward(loss)."
        )


def guard_backward(output: Any) -> None:
    """Puts the backward guard on every tensor in ``output`` that takes part in autograd."""
    if isinstance(output, Tensor):
        if output.requires_grad:
            output.register_hook(_backward_guard)  # type: ignore[no-untyped-call]
    elif isinstance(output, dict):
        for value in output.values():
            guard_backward(value)
    elif isinstance(output, (list, tuple)):
        for value in output:
            guard_backward(value)
