"""Calling hooks: every callback that defines the hook (in order), then the module; and the step methods.

Each call runs inside ``MetricStore.hook(name, stage)`` so ``self.log`` knows where it is. Which
callbacks define a hook is worked out once per run (a callback that keeps the base's no-op is skipped),
so a hook costs a dict lookup and the calls that do something.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torchloom.trainer.callbacks.callback import Callback
from torchloom.trainer.callbacks.checkpoint import ModelCheckpoint
from torchloom.trainer.callbacks.early_stopping import EarlyStopping
from torchloom.trainer.module import is_overridden

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

    def _reset_hook_cache(self) -> None:
        self.__dict__["_hook_cache"] = {}
        self.__dict__["_module_hook_cache"] = {}

    def _metric_stage(self) -> str:
        return _METRIC_STAGE.get(self.state.stage or "train", "train")

    def _call_callbacks(
        self, hook: str, *args: Any, dataloader_idx: int | None = None, monitoring: bool | None = None
    ) -> None:
        """``monitoring=True``/``False``: only the callbacks that decide on a metric (checkpointing, early
        stopping) / only the others; ``None``: all."""
        cache: dict[tuple[str, bool | None], list[Callback]] = self.__dict__.setdefault("_hook_cache", {})
        callbacks = cache.get((hook, monitoring))
        if callbacks is None:
            callbacks = [c for c in self._callbacks if defines_hook(c, hook)]
            if monitoring is not None:
                callbacks = [c for c in callbacks if isinstance(c, MONITORING) is monitoring]
            cache[(hook, monitoring)] = callbacks
        if not callbacks:
            return
        module = self._module
        with self._metrics.hook(hook, self._metric_stage(), dataloader_idx):
            for callback in callbacks:
                getattr(callback, hook)(self, module, *args)

    def _call_module(self, hook: str, *args: Any, dataloader_idx: int | None = None) -> Any:
        module = self._module
        function = getattr(module, hook, None)
        if function is None:
            return None
        cache: dict[str, bool] = self.__dict__.setdefault("_module_hook_cache", {})
        overridden = cache.get(hook)
        if overridden is None:
            overridden = cache[hook] = hook in vars(module) or is_overridden(module, hook)
        if not overridden:  # the base's own: it does not log, so it needs no logging context
            return function(*args)
        with self._metrics.hook(hook, self._metric_stage(), dataloader_idx):
            return function(*args)

    def _call(self, hook: str, *args: Any, dataloader_idx: int | None = None) -> Any:
        """The callbacks' ``hook``, then the module's; returns what the module's returned."""
        self._call_callbacks(hook, *args, dataloader_idx=dataloader_idx)
        return self._call_module(hook, *args, dataloader_idx=dataloader_idx)

    def _training_step(self, batch: Any, batch_idx: int) -> Any:
        with self._metrics.hook("training_step", "train"):
            return self._adapter.call_step("training_step", batch, batch_idx)

    def _transfer_batch(self, batch: Any, dataloader_idx: int) -> Any:
        return self._call_module("transfer_batch_to_device", batch, self._adapter.root_device, dataloader_idx)
