"""LoomModule: attachment, logging and optimization helpers, toggling, default hooks.

A small stand-in for the Trainer (local to these tests) holds the real pieces the module talks to:
a MetricStore, a core SingleDeviceStrategy, and an adapter that records calls and does the real work
through the strategy.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import pickle
import sys
import types
from collections.abc import Callable, Generator
from typing import Any, cast

import pytest
import torch
from torch import Tensor, nn
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR

from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.errors import ConfigurationError
from torchloom.core.strategies.single_device import SingleDeviceStrategy
from torchloom.trainer.callbacks.callback import Callback
from torchloom.trainer.logging import MetricStore
from torchloom.trainer.module import LoomModule, is_overridden
from torchloom.trainer.optimizers import LoomOptimizer, SchedulerConfig


class RecordingAdapter:
    def __init__(self, strategy: SingleDeviceStrategy, events: list[Any]) -> None:
        self.strategy = strategy
        self.events = events

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        self.events.append(("adapter.backward", args, kwargs))
        self.strategy.backward(loss, None, *args, **kwargs)

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        self.events.append(("adapter.optimizer_step", optimizer))
        return self.strategy.optimizer_step(optimizer, closure=closure, **kwargs)

    def clip_gradients(self, optimizer: Optimizer, clip_val: float, algorithm: str = "norm") -> None:
        self.events.append(("adapter.clip_gradients", optimizer, clip_val, algorithm))

    def zero_grad(self, optimizer: Optimizer, set_to_none: bool = True) -> None:
        self.events.append(("adapter.zero_grad", optimizer))
        self.strategy.zero_grad(optimizer, set_to_none=set_to_none)

    @contextlib.contextmanager
    def no_backward_sync(self, enabled: bool = True) -> Generator[None, None, None]:
        yield


class StandInTrainer:
    def __init__(self, module: LoomModule, optimizers: list[Optimizer] | None = None, rank: int = 0) -> None:
        self.events: list[Any] = []
        self.strategy = SingleDeviceStrategy("cpu", accelerator=CPUAccelerator())
        self._adapter = RecordingAdapter(self.strategy, self.events)
        self._metrics = MetricStore(lambda t, op: t)
        self.optimizers = optimizers or []
        self.lr_scheduler_configs: list[SchedulerConfig] = []
        self.global_rank = self.local_rank = rank
        self.is_global_zero = rank == 0
        self.current_epoch, self.global_step = 3, 17
        self.logger = "first-logger"
        self.loggers = ["first-logger", "second"]
        self.module = module
        module._attach(self)  # type: ignore[arg-type]

    def _call_callbacks(self, name: str, *args: Any) -> None:
        self.events.append(("callbacks." + name, *args))

    def _call_module(self, name: str, *args: Any) -> Any:
        self.events.append(("module." + name, *args))
        return getattr(self.module, name)(*args)


def same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    # (torch.testing.assert_close would import hypothesis here: over a second)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Net(LoomModule):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = nn.Linear(2, 1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.b(self.a(x))
        return out


# ---------------------------------------------------------------------------------------------- the trainer
def test_detached_module_explains_what_is_missing() -> None:
    net = Net()
    with pytest.raises(ConfigurationError, match="Net is not attached to a Trainer"):
        _ = net.trainer
    with pytest.raises(ConfigurationError, match=r"self.log\('loss', ...\) needs a running Trainer"):
        net.log("loss", 1.0)
    assert (net.current_epoch, net.global_step, net.global_rank, net.local_rank) == (0, 0, 0, 0)
    assert net.logger is None and net.loggers == []


def test_attached_module_reads_the_trainer() -> None:
    net = Net()
    trainer = StandInTrainer(net, rank=0)
    assert cast(object, net.trainer) is trainer
    assert (net.current_epoch, net.global_step, net.global_rank, net.local_rank) == (3, 17, 0, 0)
    assert net.logger == "first-logger" and net.loggers == ["first-logger", "second"]
    net._detach()
    with pytest.raises(ConfigurationError):
        _ = net.trainer


def test_trainer_and_caches_never_travel_with_the_module() -> None:
    net = Net()
    net.automatic_optimization = False
    trainer = StandInTrainer(net, [SGD(net.a.parameters(), lr=0.1), SGD(net.b.parameters(), lr=0.1)])
    net.optimizers()
    net.toggle_optimizer(trainer.optimizers[0])
    assert "_trainer" not in net.state_dict()
    for clone in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
        assert clone._trainer is None and clone._toggled is None and "_loom_optimizers" not in clone.__dict__
        assert clone.automatic_optimization is False
        assert same_state(clone.state_dict(), net.state_dict())


def test_device_follows_the_trainer_then_the_parameters() -> None:
    assert LoomModule().device == torch.device("cpu")
    meta = LoomModule()
    meta.layer = nn.Linear(1, 1, device="meta")
    assert meta.device == torch.device("meta")
    StandInTrainer(meta)
    assert meta.device == torch.device("cpu")


@pytest.mark.parametrize(("rank", "printed"), [(0, "hello 1\n"), (1, "")])
def test_print_on_global_rank_zero_only(rank: int, printed: str, capsys: pytest.CaptureFixture[str]) -> None:
    net = Net()
    StandInTrainer(net, rank=rank)
    net.print("hello", 1)
    assert capsys.readouterr().out == printed
    net._detach()
    net.print("detached")
    assert capsys.readouterr().out == "detached\n"  # this test process has global rank 0


# ---------------------------------------------------------------------------------------------- logging
def test_log_and_log_dict_go_to_the_metric_store() -> None:
    net = Net()
    trainer = StandInTrainer(net)
    with trainer._metrics.hook("training_step", "train"):
        net.log("loss", torch.tensor(2.0), prog_bar=True, on_epoch=True, batch_size=4)
        net.log_dict({"a": 1.0, "b": 2.0}, logger=False)
    assert trainer._metrics.step_end() == {"loss_step": 2.0}
    assert set(trainer._metrics.progress_bar_metrics) == {"loss_step"}
    assert set(trainer._metrics.callback_metrics) == {"loss", "loss_step", "a", "b"}
    assert trainer._metrics.epoch_end("train") == {"loss_epoch": 2.0}
    with pytest.raises(ConfigurationError, match="outside a Trainer hook"):
        net.log("late", 1.0)


# ---------------------------------------------------------------------------------------------- optimizers
def test_optimizers_are_stable_loom_wrappers_single_or_list() -> None:
    net = Net()
    first, second = SGD(net.a.parameters(), lr=0.1), SGD(net.b.parameters(), lr=0.1)
    trainer = StandInTrainer(net, [first])
    single = net.optimizers()
    assert isinstance(single, LoomOptimizer) and single.optimizer is first and net.optimizers() is single
    assert net.optimizers(use_loom_optimizer=False) is first
    trainer.optimizers = [first, second]
    both = net.optimizers()
    assert [o.optimizer for o in both] == [first, second] and net.optimizers() == both
    assert net.optimizers(use_loom_optimizer=False) == [first, second]
    trainer.optimizers = []
    assert net.optimizers() == []


def test_lr_schedulers_none_single_or_list() -> None:
    net = Net()
    opt = SGD(net.parameters(), lr=0.1)
    trainer = StandInTrainer(net, [opt])
    assert net.lr_schedulers() is None
    step, plateau = StepLR(opt, 1), ReduceLROnPlateau(opt)
    trainer.lr_scheduler_configs = [SchedulerConfig(step)]
    assert net.lr_schedulers() is step
    trainer.lr_scheduler_configs.append(SchedulerConfig(plateau, monitor="loss"))
    assert net.lr_schedulers() == [step, plateau]


def test_manual_backward_needs_manual_optimization() -> None:
    net = Net()
    StandInTrainer(net)
    with pytest.raises(ConfigurationError, match="automatic_optimization = False"):
        net.manual_backward(torch.tensor(1.0, requires_grad=True))


def test_manual_optimization_runs_hooks_in_order_and_steps_through_the_adapter() -> None:
    net = Net()
    net.automatic_optimization = False
    raw = SGD(net.parameters(), lr=0.1)
    trainer = StandInTrainer(net, [raw])
    before = net.a.weight.detach().clone()
    opt = net.optimizers()
    opt.zero_grad()
    loss = net(torch.ones(3, 2)).sum()
    net.manual_backward(loss, retain_graph=True)
    assert net.a.weight.grad is not None
    opt.step()
    assert not torch.equal(before, net.a.weight)
    names = [event[0] for event in trainer.events]
    assert names == [
        "adapter.zero_grad",
        "callbacks.on_before_backward",
        "module.on_before_backward",
        "adapter.backward",
        "callbacks.on_after_backward",
        "module.on_after_backward",
        "adapter.optimizer_step",
    ]
    assert trainer.events[1][1] is loss and trainer.events[3][2] == {"retain_graph": True}
    assert trainer.events[0][1] is raw and trainer.events[6][1] is raw


def test_default_optimizer_step_and_zero_grad() -> None:
    net = Net()
    raw = SGD(net.parameters(), lr=0.1)
    trainer = StandInTrainer(net, [raw])
    calls: list[str] = []

    def closure() -> Tensor:
        calls.append("closure")
        loss: Tensor = net(torch.ones(1, 2)).sum()
        torch.autograd.backward(loss)
        return loss

    net.optimizer_step(0, 0, net.optimizers(), closure)
    assert calls == ["closure"] and trainer.events == [("adapter.optimizer_step", raw)]
    net.optimizer_zero_grad(0, 0, net.optimizers())
    assert all(p.grad is None for p in net.parameters())
    assert trainer.events[-1] == ("adapter.zero_grad", raw)


def test_default_lr_scheduler_step_with_and_without_a_metric() -> None:
    net = Net()
    opt = SGD(net.parameters(), lr=1.0)
    step, plateau = StepLR(opt, 1, gamma=0.5), ReduceLROnPlateau(opt, patience=0, factor=0.1)
    opt.step()
    net.lr_scheduler_step(step, None)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    net.lr_scheduler_step(plateau, torch.tensor(1.0))
    net.lr_scheduler_step(plateau, torch.tensor(2.0))  # worse: the plateau scheduler cuts the rate
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------------- toggling
def test_toggle_freezes_everything_the_optimizer_does_not_own_and_untoggle_restores() -> None:
    net = Net()
    net.extra = nn.Linear(1, 1)  # in no optimizer
    net.b.bias.requires_grad = False  # frozen by the user: stays frozen
    opt_a, opt_b = SGD(net.a.parameters(), lr=0.1), SGD(net.b.parameters(), lr=0.1)
    outside = nn.Parameter(torch.ones(1))  # owned by an optimizer but not a module parameter
    opt_c = SGD([outside], lr=0.1)
    StandInTrainer(net, [opt_a, opt_b, opt_c])
    flags = {name: p.requires_grad for name, p in net.named_parameters()}

    net.toggle_optimizer(opt_a)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"a.weight", "a.bias"}
    assert not outside.requires_grad
    net.untoggle_optimizer(opt_a)
    assert {name: p.requires_grad for name, p in net.named_parameters()} == flags and outside.requires_grad

    wrapped_b = net.optimizers()[1]
    net.toggle_optimizer(opt_a)
    net.toggle_optimizer(wrapped_b)  # a second toggle first restores the first one
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"b.weight"}
    with pytest.raises(ConfigurationError, match="the toggled optimizer is SGD"):
        net.untoggle_optimizer(opt_a)
    net.untoggle_optimizer(wrapped_b)
    assert {name: p.requires_grad for name, p in net.named_parameters()} == flags
    net.untoggle_optimizer(opt_b)  # nothing toggled: nothing to do


def test_toggled_optimizer_context_restores_on_error_and_works_without_a_trainer() -> None:
    net = Net()
    opt_b = SGD(net.b.parameters(), lr=0.1)
    seen: list[bool] = []

    def fail_inside() -> None:
        with net.toggled_optimizer(opt_b):
            seen.extend([net.a.weight.requires_grad, net.b.weight.requires_grad])
            raise KeyError

    with pytest.raises(KeyError):
        fail_inside()
    assert seen == [False, True]
    assert all(p.requires_grad for p in net.parameters())


# ---------------------------------------------------------------------------------------------- clipping, collectives
def test_clip_gradients_validates_and_forwards_to_the_adapter() -> None:
    net = Net()
    raw = SGD(net.parameters(), lr=0.1)
    trainer = StandInTrainer(net, [raw])
    net.clip_gradients(net.optimizers(), 1)
    net.clip_gradients(raw, gradient_clip_val=0.5, gradient_clip_algorithm="value")
    net.clip_gradients(raw, None)
    net.clip_gradients(raw, 0.0)
    net.configure_gradient_clipping(raw, 2.0, "norm")
    assert trainer.events == [
        ("adapter.clip_gradients", raw, 1.0, "norm"),
        ("adapter.clip_gradients", raw, 0.5, "value"),
        ("adapter.clip_gradients", raw, 2.0, "norm"),
    ]
    with pytest.raises(ConfigurationError, match=r"gradient_clip_algorithm='l2' is not valid. Valid: 'norm', 'value'"):
        net.clip_gradients(raw, 1.0, "l2")
    for bad in (-1.0, "1", True):
        with pytest.raises(ConfigurationError, match=f"gradient_clip_val={bad!r} is not valid"):
            net.clip_gradients(raw, bad)  # type: ignore[arg-type]


def test_all_gather_and_transfer_batch_go_through_the_strategy() -> None:
    net = Net()
    StandInTrainer(net)
    gathered = net.all_gather({"x": torch.ones(2)})
    assert gathered["x"].shape == (1, 2)  # one process: a leading dimension of 1
    batch = net.transfer_batch_to_device([torch.ones(1), {"y": torch.zeros(1)}], torch.device("cpu"), 0)
    assert batch[0].device.type == "cpu" and batch[1]["y"].device.type == "cpu"


def test_freeze_and_unfreeze() -> None:
    net = Net()
    net.freeze()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    net.unfreeze()
    assert net.training and all(p.requires_grad for p in net.parameters())


# ---------------------------------------------------------------------------------------------- what the user writes
def test_missing_user_methods_raise_clear_errors_naming_the_class() -> None:
    net = Net()
    for method, args in [
        ("training_step", (None, 0)),
        ("validation_step", (None, 0)),
        ("test_step", (None, 0)),
        ("configure_optimizers", ()),
    ]:
        with pytest.raises(ConfigurationError, match=f"Net defines no {method}"):
            getattr(net, method)(*args)
    assert not hasattr(net, "train_dataloader") and not hasattr(net, "val_dataloader")


def test_is_overridden() -> None:
    class Defined(Net):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return torch.tensor(0.0)

        def on_fit_start(self) -> None:
            pass

    assert is_overridden(Defined(), "training_step") and is_overridden(Defined(), "on_fit_start")
    assert not is_overridden(Defined(), "validation_step") and not is_overridden(Net(), "training_step")
    assert is_overridden(Net(), "forward")
    assert not is_overridden(LoomModule(), "val_dataloader")


def test_default_hooks_do_nothing_and_return_none() -> None:
    net = Net()
    loss = torch.tensor(1.0)
    opt = SGD(net.parameters(), lr=0.1)
    calls: dict[str, tuple[Any, ...]] = {
        "prepare_data": (),
        "setup": ("fit",),
        "teardown": ("fit",),
        "configure_model": (),
        "on_train_batch_start": (None, 0),
        "on_train_batch_end": (None, None, 0),
        "on_validation_batch_start": (None, 0),
        "on_validation_batch_end": (None, None, 0, 1),
        "on_test_batch_start": (None, 0, 0),
        "on_test_batch_end": (None, None, 0),
        "on_predict_batch_start": (None, 0),
        "on_predict_batch_end": (None, None, 0),
        "on_before_backward": (loss,),
        "on_after_backward": (),
        "on_before_optimizer_step": (opt,),
        "on_before_zero_grad": (opt,),
        "on_save_checkpoint": ({},),
        "on_load_checkpoint": ({},),
    }
    for stage in ("fit", "train", "validation", "test", "predict"):
        calls[f"on_{stage}_start"] = calls[f"on_{stage}_end"] = ()
    for stage in ("train", "validation", "test", "predict"):
        calls[f"on_{stage}_epoch_start"] = calls[f"on_{stage}_epoch_end"] = ()
    before = copy.deepcopy(net.state_dict())
    for name, args in calls.items():
        assert getattr(net, name)(*args) is None, name
    assert same_state(net.state_dict(), before)
    assert net.configure_callbacks() == []
    x = torch.ones(4, 2)
    assert torch.equal(net.predict_step(x, 0), net(x))


def test_module_hooks_mirror_the_callback_hooks() -> None:
    """Every Callback hook but the callback-only ones exists on the module with the same arguments."""
    callback_only = {"on_exception", "on_sanity_check_start", "on_sanity_check_end", "state_dict", "load_state_dict"}
    for name, member in inspect.getmembers(Callback, inspect.isfunction):
        if name.startswith("_") or name in callback_only:
            continue
        callback_params = list(inspect.signature(member).parameters)[3:]  # self, trainer, module
        module_params = list(inspect.signature(getattr(LoomModule, name)).parameters)[1:]
        assert module_params == callback_params, name


def test_load_from_checkpoint_delegates_and_checks_the_type(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[Any] = []

    def load_module_from_checkpoint(cls: type, path: Any, **kwargs: Any) -> Any:
        received.append((cls, path, kwargs))
        return cls() if kwargs.get("hidden") != "wrong" else LoomModule()

    fake = types.ModuleType("torchloom.trainer.checkpoint")
    fake.load_module_from_checkpoint = load_module_from_checkpoint  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchloom.trainer.checkpoint", fake)
    loaded = Net.load_from_checkpoint("ckpt.pt", map_location="cpu", hidden=4)
    assert isinstance(loaded, Net)
    assert received == [(Net, "ckpt.pt", {"map_location": "cpu", "strict": True, "hidden": 4})]
    with pytest.raises(TypeError, match="loaded into LoomModule, not Net"):
        Net.load_from_checkpoint("ckpt.pt", hidden="wrong")
