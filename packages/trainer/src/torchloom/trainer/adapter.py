"""StrategyAdapter: the one place where the Trainer talks to a core strategy.

The strategy is a policy object that holds none of the user's state; the adapter holds the run's
module (the user's ``LoomModule`` and what ``setup`` wrapped it in) and turns the Trainer's needs
into the strategy's generic calls. Nothing here knows a concrete strategy class: whatever works in
Fabric works here, custom strategies included. Capabilities are read from the strategy
(``launcher``, ``requires_joint_setup``, ``distributed_sampler_kwargs``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torchloom.core.precision.precision import Precision
from torchloom.core.strategies.redirection import call_through_forward
from torchloom.core.strategies.strategy import Strategy
from torchloom.trainer.optimizers import LoomOptimizer

__all__ = ["StrategyAdapter", "raw_optimizer"]

T = TypeVar("T")
OptimizerHook = Callable[[Optimizer], None]


def raw_optimizer(optimizer: Optimizer | LoomOptimizer) -> Optimizer:
    """The torch optimizer inside a ``LoomOptimizer`` (grad scalers track optimizers by identity)."""
    return optimizer.optimizer if isinstance(optimizer, LoomOptimizer) else optimizer


def _no_op(optimizer: Optimizer) -> None:
    pass


class StrategyAdapter:
    """Runs a module's steps, backward, optimizer steps, collectives and checkpoint I/O through ``strategy``.

    ``before_optimizer_step`` runs after an optimizer's closure (forward and backward) and before its
    step: the Trainer puts the ``on_before_optimizer_step`` hooks and gradient clipping there.
    ``after_optimizer_step`` runs after each step (the Trainer counts steps there).
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.before_optimizer_step: OptimizerHook = _no_op
        self.after_optimizer_step: OptimizerHook = _no_op
        self._module: nn.Module | None = None  # the user's module
        self._wrapped: nn.Module | None = None  # what strategy.setup_module made of it
        self._kept: tuple[nn.Module, nn.Module] | None = None  # a sharded (module, wrapped) that outlives its run

    # ------------------------------------------------------------------ topology
    @property
    def precision(self) -> Precision:
        return self.strategy.precision

    @property
    def root_device(self) -> torch.device:
        return self.strategy.root_device

    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    @property
    def global_rank(self) -> int:
        return self.strategy.global_rank

    @property
    def is_distributed(self) -> bool:
        """Whether data must be split over processes (the strategy asks for a distributed sampler)."""
        return self.strategy.distributed_sampler_kwargs is not None

    @property
    def wrapped_module(self) -> nn.Module:
        if self._wrapped is None:
            raise RuntimeError("The strategy adapter has no module yet: call setup() first.")
        return self._wrapped

    # ------------------------------------------------------------------ launching
    def launch(self, function: Callable[..., T], *args: Any) -> T:
        """Runs ``function(*args)`` in every worker (here when the strategy needs no launcher)."""
        launcher = self.strategy.launcher
        if launcher is None:
            self.strategy.setup_environment()
            return function(*args)
        return launcher.launch(function, *args)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ setup and teardown
    @contextlib.contextmanager
    def module_init_context(self) -> Generator[None, None, None]:
        """Active while ``configure_model`` builds layers: on the device in the precision's dtype, or empty
        (meta) when the strategy initialises empty modules itself in setup (sharded ones: shard by shard)."""
        with self.strategy.module_init_context(empty_init=self.strategy.initializes_empty_modules):
            yield

    def setup(self, module: nn.Module, optimizers: list[Optimizer]) -> tuple[nn.Module, list[Optimizer]]:
        """Converts, moves and wraps ``module`` (with its optimizers when the strategy needs them together)."""
        if self._kept is not None and self._kept[0] is module:  # still set up by an earlier run (see teardown)
            wrapped = self._kept[1]
            optimizers = [self.strategy.setup_optimizer(o) for o in optimizers]
        else:
            module = self.precision.convert_module(module)
            self.strategy.module_to_device(module)
            if optimizers or self.strategy.requires_joint_setup:
                wrapped, optimizers, _ = self.strategy.setup_module_and_optimizers(module, optimizers)
            else:
                wrapped = self.strategy.setup_module(module)
        self._module, self._wrapped = module, wrapped
        return wrapped, optimizers

    def teardown(self) -> None:
        """Forgets the run's wrapper (the next run wraps the module afresh) and tears the strategy down.

        Except when the strategy says the setup outlives the run (a module sharded into DTensors, whose shards
        belong to the process group a teardown destroys; a DeepSpeed engine, built once per model). The module
        then stays set up, and the strategy with it, for later runs with this module (``fit`` then ``test``)
        and for saving.
        """
        if self._module is not None and self._wrapped is not None and self.strategy.setup_outlives_run(self._wrapped):
            self._kept = (self._module, self._wrapped)
            self._wrapped = None
            return
        # no reference to the wrapper may outlive the process group: a DDP reducer holding the group's last
        # reference joins gloo's thread while holding the GIL, and that thread waits for the GIL (deadlock)
        self._kept = self._wrapped = None
        self.strategy.teardown()

    # ------------------------------------------------------------------ the step
    def call_step(self, method: str, *args: Any) -> Any:
        """``module.<method>(*args)`` through the wrapper's forward (so DDP/FSDP hooks fire), in the precision."""
        precision = self.precision
        module = self._module
        wrapped = self._wrapped
        if module is None or wrapped is None:
            raise RuntimeError("The strategy adapter has no module yet: call setup() first.")
        with precision.forward_context():
            args = precision.convert_input(args)
            output = call_through_forward(wrapped, module, method, *args)
        return precision.convert_output(output)

    def batch_to_device(self, batch: Any, device: torch.device | None = None) -> Any:
        return self.strategy.batch_to_device(batch, device)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        self.strategy.backward(loss, self._wrapped, *args, **kwargs)

    def optimizer_step(
        self, optimizer: Optimizer | LoomOptimizer, closure: Callable[[], Any] | None = None, **kwargs: Any
    ) -> Any:
        """Steps ``optimizer`` through the strategy; ``closure`` (forward + backward) runs first, inside it."""
        inner = raw_optimizer(optimizer)
        before = self.before_optimizer_step
        if closure is None:
            before(inner)
            result = self.strategy.optimizer_step(inner, **kwargs)
        else:

            def closure_then_hooks() -> Any:
                output = closure()
                before(inner)
                return output

            result = self.strategy.optimizer_step(inner, closure=closure_then_hooks, **kwargs)
        self.after_optimizer_step(inner)
        return result

    def zero_grad(self, optimizer: Optimizer | LoomOptimizer, set_to_none: bool = True) -> None:
        """Clears ``optimizer``'s gradients the strategy's way (an engine that owns them clears its own)."""
        self.strategy.zero_grad(raw_optimizer(optimizer), set_to_none=set_to_none)

    def clip_gradients(
        self, optimizer: Optimizer | LoomOptimizer, clip_val: float | None, algorithm: str = "norm"
    ) -> Tensor | None:
        """Clips ``optimizer``'s gradients by total norm (returns the norm) or by value; nothing when no value."""
        if clip_val is None or clip_val <= 0:
            return None
        inner = raw_optimizer(optimizer)
        if algorithm == "value":
            self.strategy.clip_gradients_value(self.wrapped_module, inner, clip_val)
            return None
        return self.strategy.clip_gradients_norm(self.wrapped_module, inner, clip_val, error_if_nonfinite=False)

    @contextlib.contextmanager
    def no_backward_sync(self, enabled: bool = True) -> Generator[None, None, None]:
        """Backward calls inside only accumulate local gradients (gradient accumulation)."""
        if self._wrapped is None or not enabled:
            yield
            return
        with self.strategy.no_backward_sync(self._wrapped, enabled=True):
            yield

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, tensor: Any, reduce_op: str = "mean", group: Any | None = None) -> Any:
        return self.strategy.all_reduce(tensor, group=group, reduce_op=reduce_op)

    def reduce(self, tensor: Tensor, reduce_op: str) -> Tensor:
        """``(tensor, op) -> tensor``, the form ``MetricStore`` takes."""
        result: Tensor = self.strategy.all_reduce(tensor, reduce_op=reduce_op)
        return result

    def all_gather(self, tensor: Any, group: Any | None = None, sync_grads: bool = False) -> Any:
        return self.strategy.all_gather(tensor, group=group, sync_grads=sync_grads)

    def broadcast(self, obj: T, src: int = 0) -> T:
        return self.strategy.broadcast(obj, src=src)

    def barrier(self, name: str | None = None) -> None:
        self.strategy.barrier(name)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return self.strategy.reduce_boolean_decision(decision, all=all)

    # ------------------------------------------------------------------ state
    def module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        """The weights of ``module``, read through what wraps it while a run lasts (sharded strategies gather)."""
        return self.strategy.get_module_state_dict(self._wrapped if self._wrapped is not None else module)

    def load_module_state_dict(self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
        self.strategy.load_module_state_dict(module, state_dict, strict=strict)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """``optimizer``'s state; the run's module goes with it (sharded state is keyed by parameter name)."""
        return self.strategy.get_optimizer_state(raw_optimizer(optimizer), module=self._owner())

    def load_optimizer_state(self, optimizer: Optimizer, state: dict[str, Any]) -> None:
        self.strategy.load_optimizer_state(raw_optimizer(optimizer), state, module=self._owner())

    def _owner(self) -> nn.Module | None:
        """The module holding the optimizers' parameters: the run's wrapper, or the module after the run."""
        return self._wrapped if self._wrapped is not None else self._module

    def save_checkpoint(self, path: str | os.PathLike[str], checkpoint: dict[str, Any]) -> None:
        """Writes the (already plain) checkpoint dict; the strategy decides which rank writes."""
        self.strategy.save_checkpoint(path, checkpoint)

    def load_checkpoint(self, path: str | os.PathLike[str], weights_only: bool = True) -> dict[str, Any]:
        return self.strategy.load_checkpoint(path, weights_only=weights_only)

    def load_checkpoint_into(self, path: str | os.PathLike[str], entries: dict[str, Any]) -> dict[str, Any]:
        """Loads the checkpoint's entries named in ``entries`` into their live objects (the set-up module, the
        optimizers) in place, each rank reading only its shards; returns the checkpoint's other entries."""
        return self.strategy.load_checkpoint(path, state=entries, strict=True)

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        self.strategy.remove_checkpoint(path)
