"""What ``fabric.setup*`` returns: wrappers that behave like the user's objects and route through the strategy.

- ``FabricModule``: calls go precision ``convert_input`` -> ``forward_context`` -> the strategy-wrapped
  module -> ``convert_output``. Attributes are read from (and written to) the user's module;
  ``state_dict`` and ``named_parameters`` carry no wrapper prefixes. ``training_step``,
  ``validation_step``, ``test_step``, ``predict_step`` and methods named with ``mark_forward_method``
  run through the wrapper's ``forward`` so that DDP's (FSDP's) hooks fire.
- ``FabricOptimizer``: ``step`` is the strategy's; everything else is the wrapped optimizer's. It is an
  instance of the optimizer's own class, so LR schedulers accept it.
- ``FabricDataLoader``: moves each batch to the device and sets the sampler's epoch on every pass.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from torchloom.core.data import set_sampler_epoch
from torchloom.core.errors import ConfigurationError
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies.redirection import call_through_forward
from torchloom.core.strategies.strategy import Strategy, unwrap_module
from torchloom.fabric import checks
from torchloom.fabric.hooks import call_hook

__all__ = ["STEP_METHODS", "FabricDataLoader", "FabricModule", "FabricOptimizer"]

STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


class FabricModule(nn.Module):
    """The module ``fabric.setup`` returns. ``module`` is the user's, ``forward_module`` what the strategy made."""

    def __init__(
        self,
        forward_module: nn.Module,
        original_module: nn.Module,
        precision: Precision,
        guard_backward: bool = False,
    ) -> None:
        super().__init__()
        self._forward_module = forward_module  # a submodule: .to(), .train() reach the user's module through it
        self._precision = precision
        self._guard_backward = guard_backward
        self._forward_methods: set[str] = {
            name for name in STEP_METHODS if callable(getattr(original_module, name, None))
        }
        # Last: from here on, unknown attributes are set on the user's module. Kept out of _modules so
        # that it is not listed twice (it is inside forward_module).
        object.__setattr__(self, "_original_module", original_module)

    @property
    def module(self) -> nn.Module:
        """The user's module, unwrapped."""
        original: nn.Module = self.__dict__["_original_module"]
        return original

    @property
    def forward_module(self) -> nn.Module:
        """The module the strategy returned (``DistributedDataParallel``, ...); the user's module if none."""
        return self._forward_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self._forward_module, args, kwargs)

    def _run(self, target: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        args, kwargs = self._precision.convert_input((args, kwargs))
        with self._precision.forward_context():
            output = target(*args, **kwargs)
        output = self._precision.convert_output(output)
        if self._guard_backward:
            checks.guard_backward(output)
        return output

    def _redirected(self, method: str, *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(call_through_forward, self._forward_module, self.module, method)
        return self._run(call, args, kwargs)

    def mark_forward_method(self, method: str | Callable[..., Any]) -> None:
        """Makes calls to ``method`` (a name or a bound method of the module) run through the strategy's wrapper."""
        name = method if isinstance(method, str) else getattr(method, "__name__", repr(method))
        if name == "forward":
            raise ConfigurationError("mark_forward_method('forward') is not needed: forward always runs this way.")
        if not callable(getattr(self.module, name, None)):
            methods = sorted(n for n in dir(type(self.module)) if callable(getattr(self.module, n, None)))
            public = [n for n in methods if not n.startswith("_") and not hasattr(nn.Module, n)]
            raise ConfigurationError(
                f"mark_forward_method({method!r}): {type(self.module).__name__} has no method {name!r}. "
                f"Its own methods: {', '.join(public) or 'none'}."
            )
        self._forward_methods.add(name)

    # ------------------------------------------------------------------ attributes of the user's module
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # the wrapper's own parameters/buffers/submodules
        except AttributeError:
            pass
        original = self.__dict__.get("_original_module")
        if original is None:  # during construction or unpickling
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if name in self.__dict__.get("_forward_methods", ()):
            return functools.partial(self._redirected, name)
        return getattr(original, name)

    def __setattr__(self, name: str, value: Any) -> None:
        original = self.__dict__.get("_original_module")
        if original is None or name in self.__dict__ or name in self._modules or hasattr(type(self), name):
            super().__setattr__(name, value)
        else:
            setattr(original, name, value)

    # ------------------------------------------------------------------ the user's names, without wrapper prefixes
    @property
    def _named(self) -> nn.Module:
        return unwrap_module(self.module)  # also past torch.compile's wrapper and its "_orig_mod." prefix

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self._named.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self._named.load_state_dict(state_dict, strict=strict, assign=assign)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        return self._named.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Any:
        return self._named.named_buffers(prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate)

    def named_modules(self, memo: Any = None, prefix: str = "", remove_duplicate: bool = True) -> Any:
        return self._named.named_modules(memo=memo, prefix=prefix, remove_duplicate=remove_duplicate)

    def __repr__(self) -> str:
        return f"FabricModule({self.module!r})"


class FabricOptimizer(Optimizer):
    """The optimizer ``fabric.setup`` returns; an instance of the wrapped optimizer's class too.

    ``step`` runs ``strategy.optimizer_step`` (grad scaler, DeepSpeed engine, ...) and then the
    callbacks' ``on_after_optimizer_step(strategy=, optimizer=)``. ``param_groups``, ``state`` and
    ``defaults`` are the wrapped optimizer's own objects, so changing a learning rate here changes it there.
    ``module`` (the set-up module holding its parameters) goes with ``state_dict`` / ``load_state_dict`` to
    the strategy: a sharded one keys optimizer state by parameter name.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        strategy: Strategy,
        callbacks: list[Any] | None = None,
        module: nn.Module | None = None,
    ) -> None:
        # Optimizer.__init__ is not called: all state stays in the wrapped optimizer.
        self.__dict__["_optimizer"] = optimizer
        self.__dict__["_strategy"] = strategy
        self.__dict__["_callbacks"] = callbacks if callbacks is not None else []
        self.__dict__["_module"] = module  # owns the parameters; sharded strategies key optimizer state by its names
        self.__class__ = _fabric_optimizer_class(type(optimizer))

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        inner: Optimizer = self.__dict__["_optimizer"]
        return inner

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.optimizer.state = state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.optimizer.defaults = defaults

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        kwargs = {} if closure is None else {"closure": closure}
        strategy = self.__dict__["_strategy"]
        with checks.stepping_through_fabric():
            output = strategy.optimizer_step(self.optimizer, **kwargs)
        call_hook(self.__dict__["_callbacks"], "on_after_optimizer_step", strategy=strategy, optimizer=self.optimizer)
        return output

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.__dict__["_strategy"].zero_grad(self.optimizer, set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        strategy = self.__dict__["_strategy"]
        with checks.stepping_through_fabric():  # DCP may step an optimizer without state to create it
            state: dict[str, Any] = strategy.get_optimizer_state(self.optimizer, module=self.__dict__["_module"])
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        strategy = self.__dict__["_strategy"]
        with checks.stepping_through_fabric():
            strategy.load_optimizer_state(self.optimizer, state_dict, module=self.__dict__["_module"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __getattr__(self, name: str) -> Any:
        optimizer = self.__dict__.get("_optimizer")
        if optimizer is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(optimizer, name)

    def __reduce__(self) -> tuple[Any, ...]:
        # the class is made at run time and cannot be found by name: rebuild from the parts
        parts = (self.optimizer, self.__dict__["_strategy"], self.__dict__["_callbacks"], self.__dict__["_module"])
        return FabricOptimizer, parts

    def __repr__(self) -> str:
        return f"FabricOptimizer({self.optimizer!r})"


_OPTIMIZER_CLASSES: dict[type[Optimizer], type[FabricOptimizer]] = {}


def _fabric_optimizer_class(optimizer_class: type[Optimizer]) -> type[FabricOptimizer]:
    """``Fabric<Name>(FabricOptimizer, <Name>)``, made once per optimizer class."""
    if issubclass(optimizer_class, FabricOptimizer):
        raise ConfigurationError("This optimizer is a FabricOptimizer already; set up each optimizer once.")
    if optimizer_class not in _OPTIMIZER_CLASSES:
        name = f"Fabric{optimizer_class.__name__}"
        _OPTIMIZER_CLASSES[optimizer_class] = type(name, (FabricOptimizer, optimizer_class), {})
    return _OPTIMIZER_CLASSES[optimizer_class]


class FabricDataLoader:
    """Iterates the wrapped ``DataLoader``; batches go through ``strategy.batch_to_device`` when ``device`` is set.

    Each pass (each ``iter()``) sets the epoch of a sampler that has ``set_epoch`` (a
    ``DistributedSampler`` shuffles by epoch) to 0, 1, 2, ...; ``set_epoch(n)`` makes the next pass use ``n``.
    It must be iterated in the process that set it up.
    """

    def __init__(self, dataloader: Iterable[Any], strategy: Strategy, device: torch.device | None = None) -> None:
        self._dataloader = dataloader
        self._strategy = strategy
        self._device = device
        self._epoch = 0
        self._pid = os.getpid()

    @property
    def dataloader(self) -> Iterable[Any]:
        """What ``strategy.process_dataloader`` returned for the user's (possibly rebuilt) ``DataLoader``."""
        return self._dataloader

    @property
    def device(self) -> torch.device | None:
        """Where batches go (``None``: left where the dataloader puts them)."""
        return self._device

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass (the sampler's shuffling depends on it)."""
        self._epoch = epoch

    def __len__(self) -> int:
        return len(self._dataloader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        if os.getpid() != self._pid:
            raise checks.FabricUsageError(
                f"This dataloader was set up by fabric.setup_dataloaders in process {self._pid} and is being "
                f"iterated in process {os.getpid()}. Call setup_dataloaders in the process that uses it "
                "(inside the function given to fabric.launch), on the plain DataLoader."
            )
        set_sampler_epoch(self._dataloader, self._epoch)
        self._epoch += 1
        if self._device is None:
            return iter(self._dataloader)
        return (self._strategy.batch_to_device(batch, self._device) for batch in self._dataloader)

    def __getattr__(self, name: str) -> Any:
        dataloader = self.__dict__.get("_dataloader")
        if dataloader is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(dataloader, name)

    def __repr__(self) -> str:
        return f"FabricDataLoader({self._dataloader!r}, device={self._device!r})"
