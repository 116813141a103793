"""``self.log`` bookkeeping: per-step values, per-epoch reductions, and the trainer's metric dicts.

The engine marks the hook that runs (``with store.hook("training_step", "train"):``) and sets
``store.current_batch_size`` before each batch; ``LoomModule.log`` calls ``store.log``. Where a value
goes by default depends on the hook:

- ``training_step`` and the hooks of a training batch: ``on_step=True, on_epoch=False``;
- ``validation_step`` / ``test_step`` and their batch hooks: ``on_step=False, on_epoch=True``;
- epoch- and run-level hooks (``on_train_epoch_end``, ``on_validation_start``...): ``on_epoch=True``
  only (``on_step=True`` is an error there).

Other hooks (``setup``, ``on_fit_end``, ``predict_step``, checkpoint hooks...) cannot log. In the
``"sanity_check"`` stage logged values are checked, then dropped. Epoch values are means weighted by
the batch size (``sum``/``max``/``min`` with ``reduce_fx``); with ``sync_dist=True`` they are reduced
across ranks through the injected ``reduce(tensor, op)`` (the strategy's all-reduce, which must
place the tensor where its backend wants it), so a mean is the global weighted mean. ``sync_dist``
step values are reduced with ``reduce_fx`` at ``step_end``. Every rank must call ``step_end`` /
``epoch_end`` together and log the same ``sync_dist`` names.

Names logged while several evaluation dataloaders run (``hook(..., dataloader_idx=i)``) get the
suffix ``/dataloader_idx_{i}``. A value logged ``on_step`` and ``on_epoch`` reaches loggers as
``name_step`` and ``name_epoch``; ``callback_metrics[name]`` holds the latest of the two.
A step value is in ``callback_metrics`` / ``progress_bar_metrics`` as soon as it is logged (a
``sync_dist`` one once ``step_end`` reduced it). Epoch values arrive at ``epoch_end``, which may run
more than once per epoch: each call reduces what was logged since the previous one. So the engine
can call it before the ``on_train_epoch_end`` hooks (which then see the epoch's training values,
as in PyTorch Lightning) and again after them, for what those hooks logged.
Nothing here moves a tensor to the host except the ``float`` values returned for loggers.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torchloom.core.errors import ConfigurationError, choices

__all__ = ["REDUCE_FX", "STAGES", "MetricStore", "split_by_dataloader"]

REDUCE_FX = ("mean", "sum", "max", "min")
STAGES = ("train", "validate", "test", "sanity_check", "predict")
_TORCH_REDUCE_FX: dict[Any, str] = {torch.mean: "mean", torch.sum: "sum", torch.max: "max", torch.min: "min"}

_TRAIN_STEP_HOOKS = (
    "training_step",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "optimizer_step",
    "optimizer_zero_grad",
    "configure_gradient_clipping",
    "lr_scheduler_step",
)
_EVAL_STEP_HOOKS = (
    "validation_step",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "test_step",
    "on_test_batch_start",
    "on_test_batch_end",
)
_EPOCH_HOOKS = frozenset(
    (
        "on_train_start",
        "on_train_epoch_start",
        "on_train_epoch_end",
        "on_validation_start",
        "on_validation_epoch_start",
        "on_validation_epoch_end",
        "on_test_start",
        "on_test_epoch_start",
        "on_test_epoch_end",
    )
)
# hook -> (default on_step, default on_epoch)
_HOOK_DEFAULTS: dict[str, tuple[bool, bool]] = {
    **dict.fromkeys(_TRAIN_STEP_HOOKS, (True, False)),
    **dict.fromkeys(_EVAL_STEP_HOOKS, (False, True)),
    **dict.fromkeys(sorted(_EPOCH_HOOKS), (False, True)),
}


@dataclass(frozen=True)
class _Meta:
    base: str  # the name as logged
    suffix: str  # "/dataloader_idx_{i}" or ""
    prog_bar: bool
    logger: bool
    on_step: bool
    on_epoch: bool
    reduce_fx: str
    sync_dist: bool

    def key(self, fork: str = "") -> str:
        return f"{self.base}{fork}{self.suffix}"


class _Accumulator:
    """One name's epoch reduction: a weighted sum and total weight for means, else a running sum/max/min."""

    def __init__(self, meta: _Meta, value: Tensor, weight: float) -> None:
        self.meta = meta
        self.value = value * weight if meta.reduce_fx == "mean" else value
        self.weight = weight

    def add(self, value: Tensor, weight: float) -> None:
        fx = self.meta.reduce_fx
        if fx == "mean":
            self.value = self.value + value * weight
        elif fx == "sum":
            self.value = self.value + value
        elif fx == "max":
            self.value = torch.maximum(self.value, value)
        else:
            self.value = torch.minimum(self.value, value)
        self.weight += weight


def _reduce_fx_name(reduce_fx: Any) -> str:
    if reduce_fx.__class__ is str and reduce_fx in REDUCE_FX:  # the common case, checked first
        return str(reduce_fx)
    if isinstance(reduce_fx, str):
        name: Any = reduce_fx.lower()
    else:  # torch.mean & co., compared by identity (reduce_fx may be unhashable)
        name = next((n for fn, n in _TORCH_REDUCE_FX.items() if fn is reduce_fx), reduce_fx)
    if name not in REDUCE_FX:
        raise ConfigurationError(f"reduce_fx={reduce_fx!r} is not supported. Valid: {choices(REDUCE_FX)}.")
    return str(name)


_AT_LEAST_FLOAT32 = (torch.float32, torch.float64)
_MAX_METAS = 1024  # ways of logging remembered; names made up per step would otherwise grow the cache


def _as_tensor(name: str, value: Any) -> Tensor:
    tensor: Tensor
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ConfigurationError(
                f"self.log({name!r}, ...) got a tensor of shape {tuple(value.shape)}: log a number or a one-element tensor."
            )
        tensor = value.detach()
        if tensor.dim() != 0:
            tensor = tensor.reshape(())
    elif isinstance(value, numbers.Real):
        tensor = torch.tensor(float(value))
    else:
        raise ConfigurationError(
            f"self.log({name!r}, ...) got {value!r} of type {type(value).__name__}: log a number or a one-element tensor."
        )
    # reductions in at least float32, whatever precision the value was computed in
    if tensor.dtype in _AT_LEAST_FLOAT32:
        return tensor
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class MetricStore:
    """Collects what ``self.log`` records and turns it into logger values and the trainer's metric dicts."""

    def __init__(self, reduce: Callable[[Tensor, str], Tensor], *, enabled: bool = True) -> None:
        self._reduce = reduce
        self.enabled = enabled  # False under barebones=True: self.log is an error
        self.current_batch_size: int | None = None
        self.callback_metrics: dict[str, Tensor] = {}
        self.logged_metrics: dict[str, Tensor] = {}
        self.progress_bar_metrics: dict[str, Tensor] = {}
        self._hook: tuple[str, str, int | None] | None = None
        self._step: dict[str, tuple[Tensor, _Meta]] = {}
        self._epoch: dict[str, dict[str, _Accumulator]] = {}
        self._last_epoch: dict[str, dict[str, Tensor]] = {}
        self._metas: dict[tuple[Any, ...], tuple[_Meta, str, str]] = {}

    @contextlib.contextmanager
    def hook(self, name: str, stage: str, dataloader_idx: int | None = None) -> Generator[None, None, None]:
        """Marks ``name`` as the running hook of ``stage``; pass ``dataloader_idx`` when several eval loaders run."""
        if stage not in STAGES:
            raise ConfigurationError(f"stage={stage!r} is not valid. Valid: {choices(STAGES)}.")
        previous = self.swap_hook((name, stage, dataloader_idx))
        try:
            yield
        finally:
            self.swap_hook(previous)

    def swap_hook(self, hook: tuple[str, str, int | None] | None) -> tuple[str, str, int | None] | None:
        """Makes ``hook`` (name, stage, dataloader_idx) the running one and returns the one it replaces: what
        ``hook()`` does, without a context manager's cost, for the trainer's per-step calls."""
        previous, self._hook = self._hook, hook
        return previous

    def log(
        self,
        name: str,
        value: Any,
        *,
        prog_bar: bool = False,
        logger: bool = True,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: Any = "mean",
        sync_dist: bool = False,
        batch_size: int | None = None,
    ) -> None:
        if not self.enabled:
            raise ConfigurationError(f"self.log({name!r}, ...) is disabled with Trainer(barebones=True).")
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"self.log() needs a non-empty string name, got {name!r}.")
        if self._hook is None:
            raise ConfigurationError(
                f"self.log({name!r}, ...) was called outside a Trainer hook; log from training_step, "
                "validation_step, test_step or the on_* hooks while the Trainer runs them."
            )
        hook, stage, dataloader_idx = self._hook
        defaults = _HOOK_DEFAULTS.get(hook)
        if defaults is None or stage == "predict":
            raise ConfigurationError(
                f"self.log({name!r}, ...) is not supported in {hook} ({stage}). Hooks that can log: {choices(_HOOK_DEFAULTS)}."
            )
        fx = _reduce_fx_name(reduce_fx)
        tensor = _as_tensor(name, value)
        on_step = defaults[0] if on_step is None else on_step
        on_epoch = defaults[1] if on_epoch is None else on_epoch
        if on_step and hook in _EPOCH_HOOKS:
            raise ConfigurationError(
                f"self.log({name!r}, on_step=True) is not possible in {hook}: it runs once per epoch."
            )
        if not on_step and not on_epoch:
            raise ConfigurationError(
                f"self.log({name!r}, on_step=False, on_epoch=False) records nothing; set one to True."
            )
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ConfigurationError(f"self.log({name!r}, batch_size={batch_size!r}): use an int >= 1.")
        if stage == "sanity_check":
            return
        meta, key, step_key = self._meta(name, dataloader_idx, prog_bar, logger, on_step, on_epoch, fx, sync_dist)
        if on_step:
            self._step[key] = (tensor, meta)
            if not sync_dist:  # callbacks of this very step (on_train_batch_end) see it; loggers get it at step_end
                self._publish(key, step_key, tensor, meta, None)
        if on_epoch:
            weight = batch_size or (None if hook in _EPOCH_HOOKS else self.current_batch_size) or 1
            accumulators = self._epoch.setdefault(stage, {})
            accumulator = accumulators.get(key)
            if accumulator is None:
                accumulators[key] = _Accumulator(meta, tensor, weight)
            elif accumulator.meta.reduce_fx != fx:
                raise ConfigurationError(
                    f"self.log({name!r}) was logged with reduce_fx={accumulator.meta.reduce_fx!r} earlier in this "
                    f"epoch and now with {fx!r}; use one reduce_fx per name."
                )
            else:
                accumulator.add(tensor, weight)

    def _meta(
        self,
        name: str,
        dataloader_idx: int | None,
        prog_bar: bool,
        logger: bool,
        on_step: bool,
        on_epoch: bool,
        fx: str,
        sync_dist: bool,
    ) -> tuple[_Meta, str, str]:
        """``(meta, key, key of its step value)`` for one way of logging a name, made once: a training step logs
        the same names the same way every time."""
        fields = (name, dataloader_idx, prog_bar, logger, on_step, on_epoch, fx, sync_dist)
        found = self._metas.get(fields)
        if found is None:
            if len(self._metas) >= _MAX_METAS:
                self._metas.clear()
            suffix = "" if dataloader_idx is None else f"/dataloader_idx_{dataloader_idx}"
            meta = _Meta(name, suffix, prog_bar, logger, on_step, on_epoch, fx, sync_dist)
            key = meta.key()
            found = self._metas[fields] = (meta, key, meta.key("_step") if on_epoch else key)
        return found

    def _sync(self, items: list[tuple[Tensor, str]]) -> list[Tensor]:
        """Reduces every (tensor, op) across ranks, one collective per (op, device, dtype)."""
        groups: dict[tuple[str, torch.device, torch.dtype], list[int]] = {}
        for index, (tensor, op) in enumerate(items):
            groups.setdefault((op, tensor.device, tensor.dtype), []).append(index)
        results: list[Tensor] = [t for t, _ in items]
        for (op, _, _), indices in groups.items():
            reduced = self._reduce(torch.stack([items[i][0] for i in indices]), op)
            for i, value in zip(indices, reduced.unbind(0)):
                results[i] = value
        return results

    def _publish(self, key: str, log_key: str, value: Tensor, meta: _Meta, out: dict[str, float] | None) -> None:
        self.callback_metrics[key] = value
        self.callback_metrics[log_key] = value
        if meta.prog_bar:
            self.progress_bar_metrics[log_key] = value
        if meta.logger and out is not None:
            self.logged_metrics[log_key] = value
            out[log_key] = float(value)

    def step_end(self, *, for_loggers: bool = True) -> dict[str, float]:
        """Publishes this step's ``on_step`` values; returns those for loggers (``for_loggers=False``: none,
        and no host sync)."""
        pending, self._step = self._step, {}
        synced = iter(self._sync([(t, m.reduce_fx) for t, m in pending.values() if m.sync_dist]))
        out: dict[str, float] | None = {} if for_loggers else None
        for key, (value, meta) in pending.items():
            value = next(synced) if meta.sync_dist else value
            self._publish(key, meta.key("_step") if meta.on_epoch else key, value, meta, out)
        return out or {}

    def epoch_end(self, stage: str) -> dict[str, float]:
        """Reduces ``stage``'s epoch values (across ranks with ``sync_dist``), publishes them, returns those for
        loggers, and starts that stage's next epoch empty."""
        accumulators = self._epoch.pop(stage, {})
        items: list[tuple[Tensor, str]] = []
        for acc in accumulators.values():
            if acc.meta.sync_dist and acc.meta.reduce_fx == "mean":
                items += [
                    (acc.value, "sum"),
                    (torch.tensor(acc.weight, dtype=acc.value.dtype, device=acc.value.device), "sum"),
                ]
            elif acc.meta.sync_dist:
                items.append((acc.value, acc.meta.reduce_fx))
        synced = iter(self._sync(items))
        out: dict[str, float] = {}
        results: dict[str, Tensor] = {}
        for key, acc in accumulators.items():
            meta = acc.meta
            if meta.sync_dist and meta.reduce_fx == "mean":
                value = next(synced) / next(synced)
            elif meta.sync_dist:
                value = next(synced)
            else:
                value = acc.value / acc.weight if meta.reduce_fx == "mean" else acc.value
            log_key = meta.key("_epoch") if meta.on_step else key
            results[log_key] = value
            self._publish(key, log_key, value, meta, out)
        self._last_epoch[stage] = results
        return out

    def last_epoch_metrics(self, stage: str) -> dict[str, Tensor]:
        """Every epoch value of ``stage``'s last ``epoch_end`` (logger or not), by logger name: what
        ``validate``/``test`` return."""
        return dict(self._last_epoch.get(stage, {}))

    def reset(self, stage: str | None = None) -> None:
        """Drops ``stage``'s pending values (e.g. before a new validation run); with no stage, everything."""
        self._step = {}
        if stage is not None:
            self._epoch.pop(stage, None)
            return
        self._epoch = {}
        self._last_epoch = {}
        self.callback_metrics = {}
        self.logged_metrics = {}
        self.progress_bar_metrics = {}


def split_by_dataloader(metrics: Mapping[str, Any], num_dataloaders: int) -> list[dict[str, Any]]:
    """One dict per evaluation dataloader: its own ``/dataloader_idx_{i}`` values plus those shared by all."""
    tagged = [f"/dataloader_idx_{i}" for i in range(num_dataloaders)]
    shared = {k: v for k, v in metrics.items() if "/dataloader_idx_" not in k}
    return [{**shared, **{k: v for k, v in metrics.items() if k.endswith(tag)}} for tag in tagged]
