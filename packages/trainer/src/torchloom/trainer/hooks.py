"""Calling hooks: every callback that defines the hook (in order), then the module; and the step methods.

Each call runs with the hook marked in the ``MetricStore`` so ``self.log`` knows where it is. Which
callbacks define a hook, and whether the module overrides it, is worked out once per run: a callback
that keeps the base's no-op is skipped, and so is the module's base no-op, so a hook costs a dict
lookup and the calls that do something. This runs several times per training step, hence no
context managers on this path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torchloom.trainer.callbacks.callback import Callback
from torchloom.trainer.callbacks.checkpoint import ModelCheckpoint
from torchloom.trainer.callbacks.early_stopping import EarlyStopping
from torchloom.trainer.module import NO_OP_HOOKS, is_overridden

if TYPE_CHECKING:
    from torchloom.trainer.adapter import StrategyAdapter
    from torchloom.trainer.logging import MetricStore
    from torchloom.trainer.module import LoomModule
    from torchloom.trainer.state import TrainerState

__all__ = ["MONITORING", "HookCaller", "defines_hook"]

# callbacks that decide on metrics: at the end of a training epoch they run after the module's hook and
# after the epoch's training metrics are reduced, so they can monitor both
MONITORING = (ModelCheckpoint, EarlyStopping)

# state.stage -> the MetricStore stage its hooks log under
_METRIC_STAGE = {"train": "train", "sanity_check": "sanity_check", "validate": "validate", "test": "test"}
_METRIC_STAGE["predict"] = "predict"


def defines_hook(callback: Callback, hook: str) -> bool:
    """Whether ``callback`` does something in ``hook`` (an override, or a function set on the instance)."""
    attribute = getattr(callback, hook, None)
    if attribute is None:
        return False
    return getattr(attribute, "__func__", attribute) is not getattr(Callback, hook, None)


class HookCaller:
    """Mixed into ``Trainer``."""

    _callbacks: list[Callback]
    _module: LoomModule | None
    _metrics: MetricStore
    _adapter: StrategyAdapter
    state: TrainerState
    _callback_plans: dict[tuple[str, bool | None], list[Callback]]
    _module_plans: dict[str, tuple[Callable[..., Any] | None, bool]]

    def _reset_hook_cache(self) -> None:
        """Forgets which callbacks and module methods run for each hook (a new run, new module or callbacks)."""
        self._callback_plans = {}
        self._module_plans = {}

    def _metric_stage(self) -> str:
        return _METRIC_STAGE.get(self.state.stage or "train", "train")

    def _call_callbacks(
        self, hook: str, *args: Any, dataloader_idx: int | None = None, monitoring: bool | None = None
    ) -> None:
        """``monitoring=True``/``False``: only the callbacks that decide on a metric (checkpointing, early
        stopping) / only the others; ``None``: all."""
        callbacks = self._callback_plans.get((hook, monitoring))
        if callbacks is None:
            callbacks = [c for c in self._callbacks if defines_hook(c, hook)]
            if monitoring is not None:
                callbacks = [c for c in callbacks if isinstance(c, MONITORING) is monitoring]
            self._callback_plans[(hook, monitoring)] = callbacks
        if callbacks:
            self._marked((hook, self._metric_stage(), dataloader_idx), self._run_callbacks, callbacks, hook, args)

    def _run_callbacks(self, callbacks: list[Callback], hook: str, args: tuple[Any, ...]) -> None:
        module = self._module
        for callback in callbacks:
            getattr(callback, hook)(self, module, *args)

    def _call_module(self, hook: str, *args: Any, dataloader_idx: int | None = None) -> Any:
        function, logs = self._module_plans.get(hook) or self._module_plan(hook)
        if function is None:
            return None
        if not logs:
            return function(*args)
        return self._marked((hook, self._metric_stage(), dataloader_idx), function, *args)

    def _overrides(self, hook: str) -> bool:
        """Whether the module replaces the base's ``hook`` (so the Trainer must call it)."""
        return (self._module_plans.get(hook) or self._module_plan(hook))[1]

    def _marked(self, mark: tuple[str, str, int | None], function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` with ``mark`` (hook, stage, dataloader_idx) as the running hook, for ``self.log``."""
        metrics = self._metrics
        previous = metrics.swap_hook(mark)
        try:
            return function(*args)
        finally:
            metrics.swap_hook(previous)

    def _module_plan(self, hook: str) -> tuple[Callable[..., Any] | None, bool]:
        """Works out, once per run, ``(what to call or None, whether it may log)`` for the module's ``hook``: the
        base's own hooks neither log nor, if no-ops, run."""
        module = self._module
        function = getattr(module, hook, None)
        plan: tuple[Callable[..., Any] | None, bool]
        if function is None:
            plan = (None, False)
        elif hook in vars(module) or is_overridden(module, hook):
            plan = (function, True)
        else:
            plan = (None if hook in NO_OP_HOOKS else function, False)
        self._module_plans[hook] = plan
        return plan

    def _call(self, hook: str, *args: Any, dataloader_idx: int | None = None) -> Any:
        """The callbacks' ``hook``, then the module's; returns what the module's returned."""
        if self._callback_plans.get((hook, None)) != []:  # known to have no callbacks: not even a call
            self._call_callbacks(hook, *args, dataloader_idx=dataloader_idx)
        plan = self._module_plans.get(hook)
        if plan is not None and plan[0] is None:
            return None
        return self._call_module(hook, *args, dataloader_idx=dataloader_idx)

    def _training_step(self, batch: Any, batch_idx: int) -> Any:
        return self._marked(
            ("training_step", "train", None), self._adapter.call_step, "training_step", batch, batch_idx
        )

    def _transfer_batch(self, batch: Any, dataloader_idx: int) -> Any:
        if not self._overrides("transfer_batch_to_device"):  # what the base's does, two calls shorter
            return self._adapter.batch_to_device(batch)
        return self._call_module("transfer_batch_to_device", batch, self._adapter.root_device, dataloader_idx)
