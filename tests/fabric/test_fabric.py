"""Single-process tests of every Fabric method and of each wrong use it catches.

Two real ranks: test_fabric_distributed.py.
"""

from __future__ import annotations

import datetime
import os
import pickle
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.errors import ConfigurationError
from torchloom.core.loggers import CSVLogger
from torchloom.core.strategies.ddp import DDPStrategy
from torchloom.core.strategies.single_device import SingleDeviceStrategy
from torchloom.core.utils.seed import SEED_ENV
from torchloom.fabric import Fabric, FabricModule, FabricOptimizer, FabricUsageError

from .helpers import env
from .helpers.recorders import JointStrategy, RecordingLogger, RecordingStrategy


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    env.clear(monkeypatch)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def train_step(fabric: Fabric, model: Any, optimizer: Any) -> torch.Tensor:
    loss: torch.Tensor = model(torch.randn(5, 4)).pow(2).sum()
    fabric.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    return loss


# ---------------------------------------------------------------------- construction and properties
def test_defaults_resolve_to_one_cpu_process() -> None:
    fabric = Fabric(accelerator="cpu")
    assert isinstance(fabric.strategy, SingleDeviceStrategy) and isinstance(fabric.accelerator, CPUAccelerator)
    assert fabric.precision.name == "32-true" and fabric.device == torch.device("cpu")
    assert (fabric.global_rank, fabric.local_rank, fabric.node_rank, fabric.world_size) == (0, 0, 0, 1)
    assert fabric.is_global_zero and fabric.logger is None and fabric.loggers == []
    assert "SingleDeviceStrategy" in repr(fabric)


def test_loggers_and_callbacks_take_one_object_or_a_list(tmp_path: Path) -> None:
    first, second = RecordingLogger(str(tmp_path)), RecordingLogger(str(tmp_path))
    assert Fabric(accelerator="cpu", loggers=first).loggers == [first]
    fabric = Fabric(accelerator="cpu", loggers=[first, second])
    assert fabric.logger is first and fabric.loggers == [first, second]
    fabric.loggers.clear()  # a copy: the Fabric's own list is untouched
    assert fabric.loggers == [first, second]
    with pytest.raises(ConfigurationError, match="not a torchloom Logger"):
        Fabric(accelerator="cpu", loggers=["tensorboard"])  # type: ignore[list-item]


def test_under_the_cli_the_process_is_set_up_when_fabric_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHLOOM_CLI_USED", "1")
    strategy = RecordingStrategy()
    fabric = Fabric(strategy=strategy)
    assert strategy.names() == ["setup_environment"]
    assert fabric.launch() is None and fabric.launch(lambda f, x: x + 1, 1) == 2
    assert strategy.names() == ["setup_environment"], "launch() set the process up a second time"


def test_fabric_pickles_with_its_loggers_and_callbacks(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", loggers=CSVLogger(tmp_path), callbacks=[RecordingCallback()])
    copy = pickle.loads(pickle.dumps(fabric))
    assert isinstance(copy.logger, CSVLogger) and copy.logger.root_dir == str(tmp_path)
    copy.call("on_event", value=3)
    assert copy._callbacks[0].seen == [3]


# ---------------------------------------------------------------------- launch
def test_launch_on_one_device_calls_the_function_here() -> None:
    strategy = RecordingStrategy()
    logger = RecordingLogger()
    fabric = Fabric(strategy=strategy, loggers=logger)

    def function(fabric_arg: Fabric, a: int, b: int = 0) -> tuple[Any, int]:
        return fabric_arg, a + b

    assert fabric.launch(function, 1, b=2) == (fabric, 3)
    assert strategy.names() == ["setup_environment"] and logger.saves == 1  # logs made durable after it
    assert fabric.launch() is None and strategy.names() == ["setup_environment"]
    with pytest.raises(ConfigurationError, match="must be callable"):
        fabric.launch(42)  # type: ignore[arg-type]


def multi_process_fabric() -> Fabric:
    strategy = DDPStrategy(start_method="spawn", timeout=datetime.timedelta(seconds=30))
    return Fabric(accelerator="cpu", strategy=strategy, devices=2)


def test_a_multi_process_strategy_needs_launch_first(tmp_path: Path) -> None:
    fabric = multi_process_fabric()
    model, optimizer = make_model(), torch.optim.SGD(make_model().parameters(), lr=0.1)
    calls: dict[str, Callable[[], object]] = {
        "setup": lambda: fabric.setup(model, optimizer),
        "setup_module": lambda: fabric.setup_module(model),
        "setup_dataloaders": lambda: fabric.setup_dataloaders(
            torch.utils.data.DataLoader(TensorDataset(torch.ones(4)))
        ),
        "backward": lambda: fabric.backward(model(torch.ones(1, 4)).sum()),
        "barrier": lambda: fabric.barrier(),
        "broadcast": lambda: fabric.broadcast(1),
        "all_reduce": lambda: fabric.all_reduce(torch.ones(1)),
        "all_gather": lambda: fabric.all_gather(torch.ones(1)),
        "save": lambda: fabric.save(tmp_path / "x.pt", {}),
        "load": lambda: fabric.load(tmp_path / "x.pt"),
        "load_raw": lambda: fabric.load_raw(tmp_path / "x.pt", model),
        "init_module": lambda: fabric.init_module(),
        "init_tensor": lambda: fabric.init_tensor(),
        "rank_zero_first": lambda: next(iter([fabric.rank_zero_first().__enter__()])),
    }
    for name, call in calls.items():
        with pytest.raises(FabricUsageError, match=r"Call fabric\.launch\(\) first") as error:
            call()
        assert f"fabric.{name}()" in str(error.value) and "torchloom run" in str(error.value)
    with pytest.raises(FabricUsageError, match=r"fabric\.launch\(train\) with a function"):
        fabric.launch()


# ---------------------------------------------------------------------- setup
def test_setup_returns_wrappers_and_the_scheduler() -> None:
    fabric = Fabric(accelerator="cpu")
    assert isinstance(fabric.setup(make_model()), FabricModule)
    model = make_model()
    first, second = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(first, step_size=1)
    fmodel, ffirst, fsecond, fscheduler = fabric.setup(model, first, second, scheduler=scheduler)
    assert isinstance(fmodel, FabricModule) and fmodel.module is model
    assert isinstance(ffirst, FabricOptimizer) and ffirst.optimizer is first and fsecond.optimizer is second
    assert fscheduler is scheduler
    fmodel2, fopt = fabric.setup(make_model(), torch.optim.SGD(make_model().parameters(), lr=0.1))
    assert isinstance(fmodel2, FabricModule) and isinstance(fopt, FabricOptimizer)


def test_setup_converts_to_the_precision_and_moves_to_the_device() -> None:
    strategy = RecordingStrategy()
    fabric = Fabric(strategy=strategy, precision="64-true")
    model = make_model()
    fmodel = fabric.setup(model)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert ("module_to_device", model) in strategy.calls
    # a float32 input works (converted to float64 on the way in); the output comes back in the default dtype
    assert fmodel(torch.ones(1, 4)).dtype == torch.float32
    strategy.calls.clear()
    fabric.setup_module(make_model(), move_to_device=False)
    assert "module_to_device" not in strategy.names()


def test_setting_up_twice_is_refused() -> None:
    fabric = Fabric(accelerator="cpu")
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fmodel, foptimizer = fabric.setup(model, optimizer)
    with pytest.raises(FabricUsageError, match="is a FabricModule"):
        fabric.setup(fmodel)
    with pytest.raises(FabricUsageError, match="set up by this Fabric already"):
        fabric.setup_module(model)
    with pytest.raises(FabricUsageError, match="is a FabricOptimizer"):
        fabric.setup(make_model(), foptimizer)
    with pytest.raises(FabricUsageError, match="is a FabricOptimizer"):
        fabric.setup_optimizers(foptimizer)
    assert isinstance(Fabric(accelerator="cpu").setup(model), FabricModule)  # another Fabric may
    with pytest.raises(ConfigurationError, match=r"expects a torch\.nn\.Module, got str"):
        fabric.setup("model")  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="got list"):
        fabric.setup(make_model(), [optimizer])  # type: ignore[call-overload]


def test_setup_module_then_setup_optimizers() -> None:
    fabric = Fabric(accelerator="cpu")
    fmodel = fabric.setup_module(make_model())
    single = fabric.setup_optimizers(torch.optim.SGD(fmodel.parameters(), lr=0.1))
    assert isinstance(single, FabricOptimizer)
    pair = fabric.setup_optimizers(torch.optim.SGD(fmodel.parameters(), lr=0.1), torch.optim.Adam(fmodel.parameters()))
    assert isinstance(pair, tuple) and len(pair) == 2
    with pytest.raises(ConfigurationError, match="got no optimizer"):
        fabric.setup_optimizers()
    train_step(fabric, fmodel, single)


def test_a_joint_setup_strategy_refuses_separate_optimizers_and_needs_model_in_backward() -> None:
    strategy = JointStrategy()
    fabric = Fabric(strategy=strategy)
    fmodel = fabric.setup_module(make_model())
    with pytest.raises(FabricUsageError, match=r"model, optimizer = fabric\.setup\(model, optimizer\)"):
        fabric.setup_optimizers(torch.optim.SGD(fmodel.parameters(), lr=0.1))
    fabric.backward(fmodel(torch.ones(1, 4)).sum())
    assert strategy.calls[-1][:2] == ("backward", fmodel.forward_module)  # the one module, found by Fabric
    other = fabric.setup_module(make_model())
    with pytest.raises(FabricUsageError, match="model=that_model"):
        fabric.backward(other(torch.ones(1, 4)).sum())
    fabric.backward(other(torch.ones(1, 4)).sum(), model=other)
    assert strategy.calls[-1][:2] == ("backward", other.forward_module)


# ---------------------------------------------------------------------- the step
def test_backward_goes_through_the_strategy_with_its_arguments() -> None:
    strategy = RecordingStrategy()
    fabric = Fabric(strategy=strategy)
    fmodel = fabric.setup(make_model())
    loss = fmodel(torch.ones(2, 4)).sum()
    fabric.backward(loss, retain_graph=True)
    assert strategy.calls[-1] == ("backward", None, (), {"retain_graph": True})
    fabric.backward(loss, model=fmodel)
    assert strategy.calls[-1][1] is fmodel.forward_module
    assert all(p.grad is not None for p in fmodel.parameters())
    with pytest.raises(ConfigurationError, match="backward"):
        fabric.backward(loss, model="model")


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_loss_backward_is_refused_where_the_precision_customises_backward(precision: str) -> None:
    fabric = Fabric(accelerator="cpu", precision=precision)
    fmodel = fabric.setup(make_model())
    with pytest.raises(FabricUsageError, match=r"Call fabric\.backward\(loss\)"):
        fmodel(torch.ones(2, 4)).sum().backward()
    assert all(p.grad is None for p in fmodel.parameters()), "the refused backward left gradients"
    fabric.backward(fmodel(torch.ones(2, 4)).sum())
    assert all(p.grad is not None for p in fmodel.parameters())


def test_loss_backward_is_fine_in_32_bit() -> None:
    fmodel = Fabric(accelerator="cpu").setup(make_model())
    fmodel(torch.ones(2, 4)).sum().backward()
    assert all(p.grad is not None for p in fmodel.parameters())


def fill_gradients(model: nn.Module) -> None:
    for index, param in enumerate(model.parameters()):
        param.grad = torch.full_like(param, float(index + 1))


def gradients(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def test_clip_gradients_by_norm_returns_the_total_norm() -> None:
    fabric = Fabric(accelerator="cpu")
    model = make_model()
    fmodel, foptimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    fill_gradients(model)
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in gradients(model)]))
    norm = fabric.clip_gradients(fmodel, foptimizer, max_norm=1.0)
    assert norm is not None and torch.allclose(norm, expected)
    clipped = torch.linalg.vector_norm(torch.cat([g.flatten() for g in gradients(model)]))
    assert torch.allclose(clipped, torch.tensor(1.0), atol=1e-4)
    fill_gradients(model)
    inf_norm = fabric.clip_gradients(fmodel, foptimizer, max_norm=100.0, norm_type=float("inf"))
    assert inf_norm is not None and inf_norm.item() == 4.0


def test_clip_gradients_by_value_returns_none() -> None:
    fabric = Fabric(accelerator="cpu")
    model = make_model()
    fmodel, foptimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    fill_gradients(model)
    assert fabric.clip_gradients(fmodel, foptimizer, clip_val=2.5) is None
    assert [g.max().item() for g in gradients(model)] == [1.0, 2.0, 2.5, 2.5]


def test_clip_gradients_unscales_16_mixed_gradients_first() -> None:
    results: list[torch.Tensor] = []
    for precision in ("32-true", "16-mixed"):
        fabric = Fabric(accelerator="cpu", precision=precision)
        model = make_model()
        fmodel, foptimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
        fabric.backward(fmodel(torch.ones(2, 4)).mean() * 0.01)  # small: the scaled float16 gradients stay finite
        norm = fabric.clip_gradients(fmodel, foptimizer, max_norm=1e9)
        assert norm is not None
        results.append(norm)
    assert torch.allclose(results[0], results[1], rtol=1e-2), results  # not multiplied by the loss scale


def test_clip_gradients_needs_exactly_one_positive_threshold() -> None:
    fabric = Fabric(accelerator="cpu")
    model = make_model()
    fmodel, foptimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    bad: list[dict[str, Any]] = [{}, {"clip_val": 1.0, "max_norm": 1.0}]
    for kwargs in bad:
        with pytest.raises(ConfigurationError, match="exactly one"):
            fabric.clip_gradients(fmodel, foptimizer, **kwargs)
    bad = [{"clip_val": 0.0}, {"max_norm": -1.0}, {"max_norm": True}]
    for kwargs in bad:
        with pytest.raises(ConfigurationError, match="expected a number > 0"):
            fabric.clip_gradients(fmodel, foptimizer, **kwargs)
    with pytest.raises(ConfigurationError, match="FabricOptimizer"):
        fabric.clip_gradients(fmodel, "adam", max_norm=1.0)  # type: ignore[arg-type]


def test_no_backward_sync_delegates_to_the_strategy() -> None:
    strategy = RecordingStrategy()
    fabric = Fabric(strategy=strategy)
    fmodel = fabric.setup(make_model())
    with fabric.no_backward_sync(fmodel, enabled=False):
        fabric.backward(fmodel(torch.ones(1, 4)).sum())
    assert ("no_backward_sync", fmodel.forward_module, False) in strategy.calls
    with pytest.raises(ConfigurationError, match="needs the FabricModule"):
        fabric.no_backward_sync(fmodel.module)  # type: ignore[arg-type]
    with Fabric(accelerator="cpu").no_backward_sync(Fabric(accelerator="cpu").setup(make_model())):
        pass  # the single-device strategy's is a no-op


# ---------------------------------------------------------------------- devices and dtypes
def test_init_module_and_init_tensor_use_the_precision_dtype() -> None:
    fabric = Fabric(accelerator="cpu", precision="64-true")
    with fabric.init_module():
        layer = nn.Linear(2, 2)
    assert layer.weight.dtype == torch.float64
    with fabric.init_tensor():
        assert torch.ones(1).dtype == torch.float64
    assert torch.ones(1).dtype == torch.float32


def test_init_module_with_empty_init_skips_initialisation() -> None:
    class Filled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(100))
            nn.init.constant_(self.weight, 5.0)

    fabric = Fabric(accelerator="cpu")
    with fabric.init_module(empty_init=True):
        skipped = Filled()
    with fabric.init_module(empty_init=False):
        filled = Filled()
    assert torch.equal(skipped.weight, torch.zeros(100)) and torch.equal(filled.weight, torch.full((100,), 5.0))


def test_to_device_moves_modules_and_collections() -> None:
    strategy = RecordingStrategy()
    fabric = Fabric(strategy=strategy)
    model = make_model()
    assert fabric.to_device(model) is model and ("module_to_device", model) in strategy.calls
    moved = fabric.to_device({"x": [torch.ones(1), 3], "y": (torch.zeros(2),)})
    assert torch.equal(moved["x"][0], torch.ones(1)) and moved["x"][1] == 3 and isinstance(moved["y"], tuple)
    assert strategy.names()[-1] == "batch_to_device"


def test_print_only_on_local_rank_zero(capsys: pytest.CaptureFixture[str]) -> None:
    Fabric(accelerator="cpu").print("hello", 1, sep="-")
    Fabric(accelerator="cpu").print("to stderr", end="!", file=sys.stderr, flush=False)
    Fabric(strategy=RecordingStrategy(local_rank=1)).print("from rank one")
    captured = capsys.readouterr()
    assert captured.out == "hello-1\n" and captured.err == "to stderr!"


def test_autocast_is_the_precision_forward_context() -> None:
    fabric = Fabric(accelerator="cpu", precision="bf16-mixed")
    with fabric.autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with Fabric(accelerator="cpu").autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


# ---------------------------------------------------------------------- collectives on one process
def test_collectives_on_one_process() -> None:
    fabric = Fabric(accelerator="cpu")
    reduced = fabric.all_reduce({"a": torch.tensor([1.0, 2.0]), "n": [3, 0.5]}, reduce_op="sum")
    assert torch.equal(reduced["a"], torch.tensor([1.0, 2.0]))
    assert isinstance(reduced["n"][0], torch.Tensor) and reduced["n"][0].item() == 3  # numbers become tensors
    gathered = fabric.all_gather({"x": torch.ones(3), "n": 2})
    assert gathered["x"].shape == (1, 3) and torch.equal(gathered["n"], torch.tensor([2]))
    assert fabric.broadcast({"k": 1}, src=0) == {"k": 1}
    fabric.barrier("one")
    with pytest.raises(ConfigurationError, match="'mean', 'sum', 'max', 'min', 'product'"):
        fabric.all_reduce(torch.ones(1), reduce_op="median")
    order = []
    with fabric.rank_zero_first():
        order.append("body")
    assert order == ["body"]


# ---------------------------------------------------------------------- checkpoints
def trained(fabric: Fabric) -> tuple[Any, Any]:
    model = make_model()
    fmodel, foptimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    train_step(fabric, fmodel, foptimizer)
    return fmodel, foptimizer


def test_save_and_load_restore_in_place_and_return_the_rest(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu")
    fmodel, foptimizer = trained(fabric)
    path = tmp_path / "checkpoint.pt"
    fabric.save(path, {"model": fmodel, "optimizer": foptimizer, "step": 5, "meta": {"a": 1}, "extra": [1]})
    raw = torch.load(path, weights_only=True)
    assert list(raw["model"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]  # no wrapper prefixes
    assert raw["optimizer"]["state"][0]["momentum_buffer"].shape == (8, 4)

    other = Fabric(accelerator="cpu")
    model = make_model()
    fresh_model, fresh_optimizer = other.setup(model, torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9))
    state: dict[str, Any] = {"model": fresh_model, "optimizer": fresh_optimizer, "step": 0, "meta": None}
    remainder = other.load(path, state)
    assert remainder == {"extra": [1]}
    assert state["model"] is fresh_model and state["optimizer"] is fresh_optimizer
    assert state["step"] == 5 and state["meta"] == {"a": 1}
    for key, value in fmodel.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[key], value), key
    assert fresh_optimizer.param_groups[0]["lr"] == 0.1
    momentum = fresh_optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, raw["optimizer"]["state"][0]["momentum_buffer"])
    assert set(other.load(path)) == {"model", "optimizer", "step", "meta", "extra"}


def test_load_strict_reports_missing_and_unexpected_keys(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu")
    path = tmp_path / "checkpoint.pt"
    fabric.save(path, {"model": fabric.setup(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))})
    target = fabric.setup(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    with pytest.raises(RuntimeError) as error:
        fabric.load(path, {"model": target})
    message = str(error.value)
    assert 'Missing key(s) in state_dict: "2.weight", "2.bias"' in message, message
    assert 'Unexpected key(s) in state_dict: "1.weight", "1.bias"' in message, message
    fabric.load(path, {"model": target}, strict=False)
    assert torch.equal(target.state_dict()["0.weight"], torch.load(path, weights_only=True)["model"]["0.weight"])
    with pytest.raises(KeyError, match=r"has no entry for \['optimizer'\]"):
        fabric.load(path, {"model": target, "optimizer": torch.optim.SGD(target.parameters(), lr=0.1)})


def test_save_filter_keeps_what_it_selects(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu")
    fmodel = fabric.setup(make_model())
    fabric.save(tmp_path / "weights.pt", {"model": fmodel}, filter={"model": lambda key, _: key.endswith("weight")})
    assert list(torch.load(tmp_path / "weights.pt", weights_only=True)["model"]) == ["0.weight", "2.weight"]
    with pytest.raises(ConfigurationError, match=r"names \['other'\]"):
        fabric.save(tmp_path / "x.pt", {"model": fmodel}, filter={"other": lambda k, v: True})
    with pytest.raises(ConfigurationError, match="dict of names to callables"):
        fabric.save(tmp_path / "x.pt", {"model": fmodel}, filter={"model": "weight"})  # type: ignore[dict-item]
    with pytest.raises(ConfigurationError, match="must be a dict"):
        fabric.save(tmp_path / "x.pt", [fmodel])  # type: ignore[arg-type]


def test_load_raw_into_modules_optimizers_and_state_objects(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu")
    source, source_optimizer = trained(fabric)
    torch.save(source.state_dict(), tmp_path / "model.pt")
    torch.save(source_optimizer.state_dict(), tmp_path / "optimizer.pt")
    model = make_model()
    fmodel, foptimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9))
    fabric.load_raw(tmp_path / "model.pt", fmodel)
    fabric.load_raw(tmp_path / "optimizer.pt", foptimizer)
    assert all(torch.equal(fmodel.state_dict()[k], v) for k, v in source.state_dict().items())
    assert foptimizer.param_groups[0]["lr"] == 0.1
    plain = make_model()
    fabric.load_raw(tmp_path / "model.pt", plain)
    assert torch.equal(plain.state_dict()["0.weight"], source.state_dict()["0.weight"])
    scheduler = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(make_model().parameters(), lr=1.0), step_size=7)
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")
    target = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(make_model().parameters(), lr=1.0), step_size=1)
    fabric.load_raw(tmp_path / "scheduler.pt", target)
    assert target.step_size == 7
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fabric.load_raw(tmp_path / "model.pt", nn.Sequential(nn.Linear(4, 8)))
    fabric.load_raw(tmp_path / "model.pt", nn.Sequential(nn.Linear(4, 8)), strict=False)
    with pytest.raises(ConfigurationError, match="load_state_dict"):
        fabric.load_raw(tmp_path / "model.pt", 3)


# ---------------------------------------------------------------------- loggers, callbacks, seeding
def test_log_and_log_dict_reach_every_logger() -> None:
    first, second = RecordingLogger(), RecordingLogger()
    fabric = Fabric(accelerator="cpu", loggers=[first, second])
    fabric.log("loss", torch.tensor(0.25), step=3)
    fabric.log_dict({"acc": 0.5, "n": torch.tensor(2)})
    for logger in (first, second):
        assert logger.metrics == [({"loss": 0.25}, 3), ({"acc": 0.5, "n": 2.0}, 4)]
    with pytest.raises(ConfigurationError, match="single-element"):
        fabric.log("vector", torch.ones(3))


class RecordingCallback:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def on_event(self, value: int) -> None:
        self.seen.append(value)


class CatchAll:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def on_event(self, *args: Any, **kwargs: Any) -> None:
        self.seen.append((args, kwargs))


def test_call_runs_the_hook_with_the_arguments_each_callback_accepts() -> None:
    named, catch_all, unrelated = RecordingCallback(), CatchAll(), object()

    class NotCallable:
        on_event = 3

    fabric = Fabric(accelerator="cpu", callbacks=[named, catch_all, unrelated, NotCallable()])
    fabric.call("on_event", value=1, extra="x")
    fabric.call("on_other", value=2)
    assert named.seen == [1]
    assert catch_all.seen == [((), {"value": 1, "extra": "x"})]
    single = RecordingCallback()
    Fabric(accelerator="cpu", callbacks=single).call("on_event", 7)
    assert single.seen == [7]


def test_seed_everything_seeds_and_exports() -> None:
    assert Fabric.seed_everything(123) == 123
    first = (torch.rand(2), random.random())
    Fabric(accelerator="cpu").seed_everything(123, workers=True)
    assert torch.equal(torch.rand(2), first[0]) and random.random() == first[1]
    assert os.environ[SEED_ENV] == "123" and os.environ["TORCHLOOM_SEED_WORKERS"] == "1"
    with pytest.raises(ConfigurationError, match="seed=-1"):
        Fabric.seed_everything(-1)


# ---------------------------------------------------------------------- a real GPU
@pytest.mark.cuda
def test_a_loop_on_one_gpu_in_16_mixed(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cuda", devices=1, precision="16-mixed")
    assert fabric.device.type == "cuda"
    model = make_model()
    fmodel, foptimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.parameters())
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
    for (x,) in loader:
        assert x.device.type == "cuda"
        out = fmodel(x)
        assert out.dtype == torch.float32  # computed in float16 under autocast, returned in float32
        fabric.backward(out.float().pow(2).mean())
        fabric.clip_gradients(fmodel, foptimizer, max_norm=10.0)
        foptimizer.step()
        foptimizer.zero_grad()
    reduced = fabric.all_reduce({"n": 3, "t": torch.ones(2)})
    assert reduced["n"].device.type == "cuda" and reduced["t"].device.type == "cuda"
    with fabric.init_module():
        assert nn.Linear(2, 2).weight.device.type == "cuda"
    fabric.save(tmp_path / "gpu.pt", {"model": fmodel, "optimizer": foptimizer})
    other = make_model()
    fother, fother_optimizer = fabric.setup(other, torch.optim.SGD(other.parameters(), lr=1.0))
    fabric.load(tmp_path / "gpu.pt", {"model": fother, "optimizer": fother_optimizer})
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
