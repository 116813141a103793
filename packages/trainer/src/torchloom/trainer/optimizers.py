"""What ``configure_optimizers`` may return, learning-rate scheduler configs and stepping, ``LoomOptimizer``.

Accepted returns of ``configure_optimizers`` (anything else is a ``ConfigurationError``):

1. an optimizer;
2. a list or tuple of optimizers;
3. a dict ``{"optimizer": opt, "lr_scheduler": scheduler_or_config, "monitor": "key"}`` (only
   ``"optimizer"`` is required);
4. a list or tuple of such dicts;
5. a pair ``([optimizers...], [schedulers or config dicts...])``.

A scheduler config dict has ``"scheduler"`` and optionally ``"interval"`` (``"epoch"`` or ``"step"``),
``"frequency"``, ``"monitor"``, ``"strict"``, ``"name"``. Returning ``None`` or nothing is rejected:
the Trainer needs an optimizer to fit, and a manual-optimization module creates its optimizers here too.

A metric is passed to a scheduler's ``step`` only when it is a ``ReduceLROnPlateau`` or a scheduler
that is not a torch ``LRScheduler`` (a custom one) and a ``monitor`` is set: torch's other schedulers
would take the metric for an epoch number, and a ``"monitor"`` next to them is common and harmless.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.utils.rank_zero import rank_zero_warn

if TYPE_CHECKING:
    from torchloom.trainer.module import LoomModule

__all__ = ["LoomOptimizer", "SchedulerConfig", "parse_optimizers", "scheduler_metric", "step_schedulers"]

INTERVALS = ("epoch", "step")
_CONFIG_KEYS = ("scheduler", "interval", "frequency", "monitor", "strict", "name")
_OPTIMIZER_DICT_KEYS = ("optimizer", "lr_scheduler", "monitor")
_FORMS = (
    "an optimizer; a list or tuple of optimizers; a dict with 'optimizer' and optional 'lr_scheduler' "
    "(a scheduler or a config dict) and 'monitor'; a list of such dicts; or a pair "
    "([optimizers], [schedulers or config dicts])"
)


@dataclass
class SchedulerConfig:
    """A learning-rate scheduler and when to step it: every ``frequency`` ``interval``\\ s."""

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None
    strict: bool = True
    name: str | None = None

    def __post_init__(self) -> None:
        if self.interval not in INTERVALS:
            raise ConfigurationError(
                f"A scheduler interval of {self.interval!r} is not valid. Valid: {choices(INTERVALS)}."
            )
        if isinstance(self.frequency, bool) or not isinstance(self.frequency, int) or self.frequency < 1:
            raise ConfigurationError(f"A scheduler frequency of {self.frequency!r} is not valid: use an int >= 1.")
        if not callable(getattr(self.scheduler, "step", None)) or not callable(
            getattr(self.scheduler, "state_dict", None)
        ):
            raise ConfigurationError(
                f"{self.scheduler!r} is not a learning-rate scheduler: it needs step() and state_dict() "
                "(a torch.optim.lr_scheduler.LRScheduler, for instance)."
            )
        if self.is_plateau and self.monitor is None:
            raise ConfigurationError(
                "ReduceLROnPlateau needs a metric to watch: return {'optimizer': opt, 'lr_scheduler': "
                "{'scheduler': scheduler, 'monitor': 'val_loss'}} (any key you self.log)."
            )

    @property
    def is_plateau(self) -> bool:
        return isinstance(self.scheduler, ReduceLROnPlateau)

    @property
    def takes_metric(self) -> bool:
        """Whether ``step`` is given the monitored metric (see the module docstring)."""
        return self.monitor is not None and (self.is_plateau or not isinstance(self.scheduler, LRScheduler))


def _config(item: Any, monitor: str | None) -> SchedulerConfig:
    if isinstance(item, Mapping):
        unknown = [k for k in item if k not in _CONFIG_KEYS]
        if unknown or "scheduler" not in item:
            problem = f"has unknown keys {unknown}" if unknown else "has no 'scheduler'"
            raise ConfigurationError(
                f"The lr scheduler config {dict(item)!r} {problem}. Valid keys: {choices(_CONFIG_KEYS)}."
            )
        fields = {"monitor": monitor, **item}
        return SchedulerConfig(**fields)
    return SchedulerConfig(item, monitor=monitor)


def _from_dict(item: Mapping[str, Any]) -> tuple[Optimizer, list[SchedulerConfig]]:
    unknown = [k for k in item if k not in _OPTIMIZER_DICT_KEYS]
    if unknown or "optimizer" not in item:
        problem = f"has unknown keys {unknown}" if unknown else "has no 'optimizer'"
        raise ConfigurationError(
            f"configure_optimizers() returned a dict that {problem}. Valid keys: {choices(_OPTIMIZER_DICT_KEYS)}."
        )
    scheduler = item.get("lr_scheduler")
    return item["optimizer"], [] if scheduler is None else [_config(scheduler, item.get("monitor"))]


def _split(result: Any) -> tuple[list[Any], list[SchedulerConfig]]:
    if isinstance(result, Optimizer):
        return [result], []
    if isinstance(result, Mapping):
        optimizer, configs = _from_dict(result)
        return [optimizer], configs
    if isinstance(result, (list, tuple)) and result:
        if all(isinstance(item, Mapping) for item in result):
            pairs = [_from_dict(item) for item in result]
            return [opt for opt, _ in pairs], [config for _, configs in pairs for config in configs]
        if len(result) == 2 and isinstance(result[0], (list, tuple)) and isinstance(result[1], (list, tuple)):
            return list(result[0]), [_config(item, None) for item in result[1]]
        return list(result), []
    raise ConfigurationError(f"configure_optimizers() returned {result!r}, which is not usable. Return {_FORMS}.")


def parse_optimizers(result: Any) -> tuple[list[Optimizer], list[SchedulerConfig]]:
    """The optimizers and scheduler configs in a ``configure_optimizers`` return value (see the module docstring)."""
    optimizers, configs = _split(result)
    for optimizer in optimizers:
        if not isinstance(optimizer, Optimizer):
            raise ConfigurationError(
                f"configure_optimizers() returned {optimizer!r} ({type(optimizer).__name__}) where an optimizer "
                f"belongs: use a torch.optim.Optimizer. Accepted forms: {_FORMS}."
            )
    if not optimizers:
        raise ConfigurationError(f"configure_optimizers() returned no optimizer. Return {_FORMS}.")
    if len({id(o) for o in optimizers}) != len(optimizers):
        raise ConfigurationError("configure_optimizers() returned the same optimizer twice; it would step twice.")
    for config in configs:
        owner = getattr(config.scheduler, "optimizer", None)
        if owner is not None and not any(owner is o for o in optimizers):
            raise ConfigurationError(
                f"The scheduler {type(config.scheduler).__name__} drives an optimizer that configure_optimizers() "
                "did not return; build it on one of the returned optimizers."
            )
    return optimizers, configs


def scheduler_metric(config: SchedulerConfig, metrics: Mapping[str, Tensor]) -> Tensor | None:
    """The value of ``config.monitor`` in ``metrics``, or ``None`` when the scheduler takes no metric.

    A missing key raises (``strict=True``, listing the keys there are) or warns and gives ``None``.
    """
    if not config.takes_metric:
        return None
    assert config.monitor is not None
    if config.monitor in metrics:
        return metrics[config.monitor]
    message = (
        f"The scheduler {type(config.scheduler).__name__} monitors {config.monitor!r}, which was not logged. "
        f"Logged metrics: {choices(sorted(metrics)) or 'none'}. Log it with self.log({config.monitor!r}, value)"
    )
    if config.strict:
        raise ConfigurationError(message + ", or set 'strict': False in the scheduler config to skip the step.")
    rank_zero_warn(message + "; the scheduler step is skipped.")
    return None


def step_schedulers(
    configs: Sequence[SchedulerConfig],
    interval: str,
    progress: int,
    metrics: Mapping[str, Tensor],
    step: Callable[[Any, Tensor | None], None],
) -> None:
    """Steps the schedulers of ``interval`` due now.

    ``progress`` counts the intervals completed (optimizer steps taken, or epochs finished); a config
    is due when it is a multiple of its ``frequency``. ``step`` is the module's ``lr_scheduler_step``.
    A non-strict config whose monitored metric is missing is skipped.
    """
    for config in configs:
        if config.interval != interval or progress % config.frequency != 0:
            continue
        metric = scheduler_metric(config, metrics)
        if config.takes_metric and metric is None:
            continue
        step(config.scheduler, metric)


class LoomOptimizer:
    """What ``LoomModule.optimizers()`` returns: the optimizer, with ``step`` going through the trainer.

    ``step`` hands the optimizer to the trainer's strategy adapter, which runs the closure, the
    ``on_before_optimizer_step`` hooks and the strategy's (precision's) step. Every other attribute
    (``param_groups``, ``state``, ``state_dict``...) is the wrapped optimizer's.
    """

    def __init__(self, optimizer: Optimizer, module: LoomModule) -> None:
        self._optimizer = optimizer
        self._module = module

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped torch optimizer."""
        return self._optimizer

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        return self._module.trainer._adapter.optimizer_step(self._optimizer, closure=closure, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._module.trainer._adapter.zero_grad(self._optimizer, set_to_none=set_to_none)

    @contextlib.contextmanager
    def toggle_model(self, sync_grad: bool = True) -> Generator[None, None, None]:
        """Only this optimizer's parameters get gradients inside; ``sync_grad=False`` skips the gradient sync
        of backward calls inside (for manual gradient accumulation under DDP)."""
        self._module.toggle_optimizer(self)
        try:
            with self._module.trainer._adapter.no_backward_sync(enabled=not sync_grad):
                yield
        finally:
            self._module.untoggle_optimizer(self)

    def __getattr__(self, name: str) -> Any:
        # reached only for names the wrapper lacks; during unpickling __dict__ may still be empty
        optimizer = self.__dict__.get("_optimizer")
        if optimizer is None:
            raise AttributeError(name)
        return getattr(optimizer, name)

    def __repr__(self) -> str:
        return f"LoomOptimizer({self._optimizer!r})"
