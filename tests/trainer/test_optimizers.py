"""configure_optimizers forms and rejections, scheduler configs and stepping, LoomOptimizer forwarding."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.optim import SGD, Adam, Optimizer
from torch.optim.lr_scheduler import ExponentialLR, ReduceLROnPlateau, StepLR

from torchloom.core.errors import ConfigurationError
from torchloom.trainer.module import LoomModule
from torchloom.trainer.optimizers import (
    LoomOptimizer,
    SchedulerConfig,
    parse_optimizers,
    scheduler_metric,
    step_schedulers,
)

model = nn.Linear(2, 2)
other = nn.Linear(2, 2)


def sgd(module: nn.Module = model) -> SGD:
    return SGD(module.parameters(), lr=1.0)


# ---------------------------------------------------------------------------------------------- accepted forms
def test_a_single_optimizer() -> None:
    opt = sgd()
    assert parse_optimizers(opt) == ([opt], [])


@pytest.mark.parametrize("container", [list, tuple])
def test_a_list_or_tuple_of_optimizers(container: Callable[[list[Any]], Any]) -> None:
    a, b = sgd(model), Adam(other.parameters())
    assert parse_optimizers(container([a, b])) == ([a, b], [])


def test_a_dict_without_and_with_a_bare_scheduler() -> None:
    opt = sgd()
    assert parse_optimizers({"optimizer": opt}) == ([opt], [])
    scheduler = StepLR(opt, step_size=1)
    optimizers, configs = parse_optimizers({"optimizer": opt, "lr_scheduler": scheduler})
    assert optimizers == [opt]
    assert configs == [SchedulerConfig(scheduler)]
    assert (configs[0].interval, configs[0].frequency, configs[0].monitor, configs[0].strict) == (
        "epoch",
        1,
        None,
        True,
    )


def test_a_dict_with_a_scheduler_config() -> None:
    opt = sgd()
    scheduler = ExponentialLR(opt, gamma=0.5)
    config = {"scheduler": scheduler, "interval": "step", "frequency": 3, "name": "exp", "strict": False}
    _, configs = parse_optimizers({"optimizer": opt, "lr_scheduler": config})
    assert configs == [SchedulerConfig(scheduler, interval="step", frequency=3, name="exp", strict=False)]


def test_plateau_takes_the_monitor_from_the_dict_or_the_config() -> None:
    opt = sgd()
    plateau = ReduceLROnPlateau(opt)
    _, configs = parse_optimizers({"optimizer": opt, "lr_scheduler": plateau, "monitor": "val_loss"})
    assert configs[0].monitor == "val_loss" and configs[0].is_plateau and configs[0].takes_metric
    config = {"scheduler": plateau, "monitor": "inner"}
    _, configs = parse_optimizers({"optimizer": opt, "lr_scheduler": config, "monitor": "outer"})
    assert configs[0].monitor == "inner"


def test_a_list_of_dicts() -> None:
    a, b = sgd(model), sgd(other)
    sa = StepLR(a, 1)
    optimizers, configs = parse_optimizers([{"optimizer": a, "lr_scheduler": sa}, {"optimizer": b}])
    assert optimizers == [a, b] and [c.scheduler for c in configs] == [sa]


@pytest.mark.parametrize("container", [list, tuple])
def test_a_pair_of_optimizers_and_schedulers(container: Callable[[list[Any]], Any]) -> None:
    a, b = sgd(model), sgd(other)
    sa, sb = StepLR(a, 1), ExponentialLR(b, 0.9)
    optimizers, configs = parse_optimizers(container([[a, b], [sa, {"scheduler": sb, "interval": "step"}]]))
    assert optimizers == [a, b]
    assert [(c.scheduler, c.interval) for c in configs] == [(sa, "epoch"), (sb, "step")]
    assert parse_optimizers(([a], [])) == ([a], [])


# ---------------------------------------------------------------------------------------------- rejections
FORMS = r"Return an optimizer; a list or tuple of optimizers; a dict"


@pytest.mark.parametrize("result", [None, [], (), "adam", 3, {1, 2}], ids=repr)
def test_unusable_returns_name_what_was_returned_and_list_the_forms(result: Any) -> None:
    with pytest.raises(ConfigurationError, match=FORMS) as info:
        parse_optimizers(result)
    assert "configure_optimizers() returned" in str(info.value)


def test_non_optimizers_in_an_optimizer_slot() -> None:
    with pytest.raises(ConfigurationError, match=r"returned 'adam' \(str\) where an optimizer belongs"):
        parse_optimizers([sgd(), "adam"])
    with pytest.raises(ConfigurationError, match=r"where an optimizer belongs"):
        parse_optimizers({"optimizer": model})
    with pytest.raises(ConfigurationError, match=r"where an optimizer belongs"):
        parse_optimizers([[model], []])
    with pytest.raises(ConfigurationError, match="where an optimizer belongs"):
        parse_optimizers([{"optimizer": sgd()}, sgd()])  # dicts and optimizers mixed


def test_bad_optimizer_dicts_list_the_valid_keys() -> None:
    with pytest.raises(
        ConfigurationError, match=r"has no 'optimizer'. Valid keys: 'optimizer', 'lr_scheduler', 'monitor'"
    ):
        parse_optimizers({"lr_scheduler": None})
    with pytest.raises(ConfigurationError, match=r"unknown keys \['frequency'\]"):
        parse_optimizers({"optimizer": sgd(), "frequency": 2})


def test_bad_scheduler_configs() -> None:
    opt = sgd()
    scheduler = StepLR(opt, 1)
    cases: list[tuple[Any, str]] = [
        ({"interval": "step"}, r"has no 'scheduler'. Valid keys: 'scheduler', 'interval', 'frequency'"),
        ({"scheduler": scheduler, "opt_idx": 0}, r"unknown keys \['opt_idx'\]"),
        ({"scheduler": scheduler, "interval": "batch"}, r"interval of 'batch' is not valid. Valid: 'epoch', 'step'"),
        ({"scheduler": scheduler, "frequency": 0}, "frequency of 0 is not valid"),
        ({"scheduler": scheduler, "frequency": 1.5}, "frequency of 1.5 is not valid"),
        ({"scheduler": scheduler, "frequency": True}, "frequency of True is not valid"),
        ({"scheduler": "steplr"}, "'steplr' is not a learning-rate scheduler"),
        (ReduceLROnPlateau(opt), "ReduceLROnPlateau needs a metric to watch"),
    ]
    for config, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            parse_optimizers({"optimizer": opt, "lr_scheduler": config})


def test_duplicate_optimizers_and_foreign_schedulers_are_rejected() -> None:
    opt = sgd()
    with pytest.raises(ConfigurationError, match="same optimizer twice"):
        parse_optimizers([opt, opt])
    with pytest.raises(ConfigurationError, match="StepLR drives an optimizer that configure_optimizers"):
        parse_optimizers({"optimizer": opt, "lr_scheduler": StepLR(sgd(other), 1)})


# ---------------------------------------------------------------------------------------------- metrics and stepping
class CustomScheduler:
    """A scheduler that is not a torch LRScheduler and takes a metric."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def step(self, metric: Any = None) -> None:
        self.seen.append(metric)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": len(self.seen)}


def test_scheduler_metric() -> None:
    opt = sgd()
    metrics = {"val_loss": torch.tensor(0.5), "acc": torch.tensor(1.0)}
    assert scheduler_metric(SchedulerConfig(StepLR(opt, 1)), metrics) is None
    # torch's epoch-style schedulers never get a metric (they would read it as an epoch number)
    assert scheduler_metric(SchedulerConfig(StepLR(opt, 1), monitor="val_loss"), metrics) is None
    plateau = SchedulerConfig(ReduceLROnPlateau(opt), monitor="val_loss")
    assert scheduler_metric(plateau, metrics) is metrics["val_loss"]
    assert scheduler_metric(SchedulerConfig(CustomScheduler(), monitor="acc"), metrics) is metrics["acc"]
    with pytest.raises(
        ConfigurationError, match=r"monitors 'loss', which was not logged. Logged metrics: 'acc', 'val_loss'"
    ):
        scheduler_metric(SchedulerConfig(ReduceLROnPlateau(opt), monitor="loss"), metrics)
    lenient = SchedulerConfig(ReduceLROnPlateau(opt), monitor="loss", strict=False)
    with pytest.warns(UserWarning, match="step is skipped"):
        assert scheduler_metric(lenient, metrics) is None


def test_step_schedulers_follows_interval_frequency_and_monitor() -> None:
    opt = sgd()
    every_epoch = SchedulerConfig(StepLR(opt, 1, gamma=0.5))
    every_2_steps = SchedulerConfig(CustomScheduler(), interval="step", frequency=2)
    plateau = SchedulerConfig(ReduceLROnPlateau(opt), monitor="val_loss")
    lenient = SchedulerConfig(CustomScheduler(), monitor="missing", strict=False)
    configs = [every_epoch, every_2_steps, plateau, lenient]
    calls: list[tuple[Any, Tensor | None]] = []
    metrics = {"val_loss": torch.tensor(2.0)}

    def record(scheduler: Any, metric: Tensor | None) -> None:
        calls.append((scheduler, metric))

    for step in (1, 2, 3, 4):
        step_schedulers(configs, "step", step, metrics, record)
    assert calls == [(every_2_steps.scheduler, None)] * 2
    calls.clear()
    with pytest.warns(UserWarning, match="'missing'"):
        step_schedulers(configs, "epoch", 1, metrics, record)
    assert calls == [(every_epoch.scheduler, None), (plateau.scheduler, metrics["val_loss"])]


def test_step_schedulers_steps_real_schedulers_through_the_module_hook() -> None:
    opt = sgd()
    configs = [SchedulerConfig(StepLR(opt, 1, gamma=0.5))]
    module = LoomModule()
    for epoch in (1, 2):
        opt.step()
        step_schedulers(configs, "epoch", epoch, {}, module.lr_scheduler_step)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------- LoomOptimizer
class RecordingAdapter:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def optimizer_step(self, optimizer: Optimizer, closure: Any = None, **kwargs: Any) -> Any:
        self.calls.append(("step", optimizer, kwargs))
        loss = closure() if closure is not None else None
        optimizer.step()
        return loss

    def zero_grad(self, optimizer: Optimizer, set_to_none: bool = True) -> None:
        self.calls.append(("zero_grad", optimizer))
        optimizer.zero_grad(set_to_none=set_to_none)

    @contextlib.contextmanager
    def no_backward_sync(self, enabled: bool = True) -> Generator[None, None, None]:
        self.calls.append(("no_sync", enabled))
        yield


class Trainerish:
    def __init__(self, optimizers: list[Optimizer]) -> None:
        self._adapter = RecordingAdapter()
        self.optimizers = optimizers


def wrapped(module: LoomModule, optimizer: Optimizer) -> tuple[LoomOptimizer, RecordingAdapter]:
    trainer = Trainerish([optimizer])
    module._attach(trainer)  # type: ignore[arg-type]
    return LoomOptimizer(optimizer, module), trainer._adapter


class Pair(LoomModule):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 1)
        self.b = nn.Linear(1, 1)


def test_step_goes_through_the_adapter_with_closure_and_kwargs() -> None:
    module = Pair()
    raw = SGD(module.parameters(), lr=0.1)
    opt, adapter = wrapped(module, raw)
    before = module.a.weight.detach().clone()

    def closure() -> Tensor:
        loss: Tensor = module.a(torch.ones(1, 2)).sum()
        torch.autograd.backward(loss)
        return loss

    result = opt.step(closure=closure, extra=1)
    assert adapter.calls == [("step", raw, {"extra": 1})]
    assert isinstance(result, Tensor) and not torch.equal(before, module.a.weight)
    opt.zero_grad()
    assert module.a.weight.grad is None
    assert adapter.calls[-1] == ("zero_grad", raw)  # through the strategy: an engine owns its gradients


def test_everything_else_is_the_wrapped_optimizers() -> None:
    module = LoomModule()
    raw = SGD(nn.Linear(2, 1).parameters(), lr=0.3)
    opt, _ = wrapped(module, raw)
    assert opt.optimizer is raw and opt.param_groups is raw.param_groups and opt.state is raw.state
    assert opt.state_dict() == raw.state_dict() and opt.defaults["lr"] == 0.3
    opt.zero_grad(set_to_none=False)
    with pytest.raises(AttributeError, match="nope"):
        _ = opt.nope
    assert "LoomOptimizer(SGD" in repr(opt)


@pytest.mark.parametrize("sync_grad", [True, False])
def test_toggle_model_toggles_and_controls_gradient_sync(sync_grad: bool) -> None:
    module = Pair()
    opt_a = SGD(module.a.parameters(), lr=1.0)
    opt, adapter = wrapped(module, opt_a)
    seen: list[bool] = []

    def fail_inside() -> None:
        with opt.toggle_model(sync_grad=sync_grad):
            seen.extend([module.a.weight.requires_grad, module.b.weight.requires_grad])
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        fail_inside()
    assert seen == [True, False]
    assert all(p.requires_grad for p in module.parameters())
    assert adapter.calls == [("no_sync", not sync_grad)]
