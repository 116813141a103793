"""Bringing a run's results back when its workers were other processes (``ddp_spawn``, ``ddp_fork``).

A launcher that starts fresh processes (or forks) runs ``fit`` on copies of the trainer, the module
and the callbacks; the caller's objects never see the training. Global rank 0 therefore packs what
the caller needs (the trained weights, the loop counters, the metric dicts, every callback's state,
the return value) and the launcher hands it back; ``apply`` writes it into the caller's objects.
Whether the run happened elsewhere is decided by process id, not by the launcher's class, so any
launcher that runs the function in other processes gets the same treatment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from torchloom.trainer.callbacks.checkpoint import ModelCheckpoint

if TYPE_CHECKING:
    from torchloom.trainer.trainer import Trainer

__all__ = ["WorkerResult", "apply", "collect"]


@dataclass
class WorkerResult:
    pid: int  # the process that ran the function
    output: Any = None
    weights: dict[str, Any] | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    should_stop: bool = False
    preempted: bool = False
    callback_metrics: dict[str, Any] = field(default_factory=dict)
    logged_metrics: dict[str, Any] = field(default_factory=dict)
    progress_bar_metrics: dict[str, Any] = field(default_factory=dict)
    callback_states: list[dict[str, Any]] = field(default_factory=list)


def collect(trainer: Trainer, output: Any, caller_pid: int) -> WorkerResult:
    """Packs the run's results; the weights only when this is not the process that called ``fit``."""
    result = WorkerResult(pid=os.getpid(), output=output)
    if result.pid == caller_pid:
        return result  # ran in the caller: its objects are already up to date
    store = trainer._metrics
    # every rank gathers sharded tensors (DTensors) whole, in the same order: it is a collective
    result.weights = {k: _whole(v).detach().cpu() for k, v in trainer.loom_module.state_dict().items()}
    result.progress = trainer._progress.state_dict()
    result.should_stop = trainer.should_stop
    result.preempted = trainer.state.preempted
    result.callback_metrics = dict(store.callback_metrics)
    result.logged_metrics = dict(store.logged_metrics)
    result.progress_bar_metrics = dict(store.progress_bar_metrics)
    result.callback_states = [callback.state_dict() for callback in trainer._base_callbacks]
    return result


def _whole(tensor: Tensor) -> Tensor:
    gather = getattr(tensor, "full_tensor", None)  # a DTensor's whole value
    full: Tensor = gather() if callable(gather) else tensor
    return full


def apply(trainer: Trainer, result: WorkerResult | None) -> Any:
    """Writes a worker's results into the caller's trainer, module and callbacks; returns the run's output."""
    if result is None or result.pid == os.getpid():
        return None if result is None else result.output
    if result.weights is not None:
        module = trainer.loom_module
        if not set(result.weights) <= set(module.state_dict()):  # layers the workers built in configure_model
            module.configure_model()
        module.load_state_dict(result.weights)
    trainer._progress.load_state_dict(result.progress)
    trainer.should_stop = result.should_stop
    trainer.state.preempted = result.preempted
    store = trainer._metrics
    store.callback_metrics = result.callback_metrics
    store.logged_metrics = result.logged_metrics
    store.progress_bar_metrics = result.progress_bar_metrics
    for callback, state in zip(trainer._base_callbacks, result.callback_states):
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = state.get("dirpath")  # resolved in the worker's setup
        callback.load_state_dict(state)
    return result.output
