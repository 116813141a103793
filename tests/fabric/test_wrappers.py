"""FabricModule, FabricOptimizer and FabricDataLoader behave like the user's objects and route through the strategy."""

from __future__ import annotations

import copy
import datetime
import multiprocessing
import pickle
from collections.abc import Generator
from typing import Any, cast

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from torchloom.core import distributed
from torchloom.core.environments.local import find_free_port
from torchloom.core.errors import ConfigurationError
from torchloom.fabric import Fabric, FabricDataLoader, FabricModule, FabricOptimizer, FabricUsageError
from torchloom.fabric.wrappers import STEP_METHODS

from .helpers import env
from .helpers.datasets import numbers
from .helpers.recorders import RecordingStrategy

# DDP and torch.compile import torch._dynamo, which trips torch's own deprecation of torch.jit.script_method
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    env.clear(monkeypatch)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros(()))
        self.scale = 2.0

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.layer(x) * self.scale
        return out

    def training_step(self, x: Tensor) -> Tensor:
        loss: Tensor = self(x).sum()
        return loss

    def embed(self, x: Tensor) -> Tensor:
        out: Tensor = self.layer(x)
        return out

    def helper(self) -> str:
        return "helped"


@pytest.fixture
def process_group() -> Generator[None, None, None]:
    """A real one-process gloo group, so that DistributedDataParallel can wrap a module here."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{find_free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        yield
    finally:
        distributed.destroy_process_group()  # keeps the group's handle while a test's DDP wrapper may live


def wrap(module: nn.Module, forward_module: nn.Module | None = None, precision: str = "32-true") -> FabricModule:
    fabric = Fabric(accelerator="cpu", precision=precision)
    return FabricModule(forward_module or module, module, fabric.precision)


# ---------------------------------------------------------------------- FabricModule
def test_module_wrapper_forwards_attributes_both_ways() -> None:
    net = Net()
    wrapped = wrap(net)
    assert wrapped.module is net and wrapped.forward_module is net
    assert wrapped.scale == 2.0 and wrapped.layer is net.layer and wrapped.helper() == "helped"
    wrapped.scale = 3.0
    wrapped.new_attribute = "x"
    assert net.scale == 3.0 and net.new_attribute == "x"
    assert "scale" not in wrapped.__dict__ and "new_attribute" not in wrapped.__dict__
    wrapped.eval()
    assert not wrapped.training and not net.training
    with pytest.raises(AttributeError, match="missing"):
        _ = wrapped.missing
    assert repr(wrapped).startswith("FabricModule(Net(")


def test_module_wrapper_names_carry_no_wrapper_prefixes(process_group: None) -> None:
    net = Net()
    wrapped = wrap(net, DistributedDataParallel(net))
    expected_keys = ["count", "layer.weight", "layer.bias"]
    assert sorted(wrapped.state_dict()) == sorted(expected_keys)
    assert [n for n, _ in wrapped.named_parameters()] == ["layer.weight", "layer.bias"]
    assert [n for n, _ in wrapped.named_buffers()] == ["count"]
    assert [n for n, _ in wrapped.named_modules()] == ["", "layer"]
    assert list(wrapped.parameters()) == list(net.parameters())
    state = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    wrapped.load_state_dict(state)
    assert torch.equal(net.layer.weight, torch.zeros(2, 3))
    assert [n for n, _ in wrapped.forward_module.named_parameters()] == ["module.layer.weight", "module.layer.bias"]


def test_module_wrapper_names_skip_torch_compile_prefixes() -> None:
    net = Net()
    wrapped = wrap(cast(nn.Module, torch.compile(net)))  # not called, so nothing is compiled
    assert sorted(wrapped.state_dict()) == ["count", "layer.bias", "layer.weight"]
    assert [n for n, _ in wrapped.named_parameters()] == ["layer.weight", "layer.bias"]


def test_step_methods_and_marked_methods_run_through_the_strategy_wrapper(process_group: None) -> None:
    net = Net()
    ddp = DistributedDataParallel(net)
    wrapper_calls: list[int] = []
    ddp.register_forward_pre_hook(lambda *_: wrapper_calls.append(1))
    wrapped = wrap(net, ddp)
    x = torch.ones(4, 3)
    loss = wrapped.training_step(x)
    assert wrapper_calls == [1] and torch.equal(loss, net(x).sum())
    loss.backward()
    assert net.layer.weight.grad is not None
    wrapped.embed(x)  # not marked: runs directly
    assert wrapper_calls == [1]
    wrapped.mark_forward_method("embed")
    assert torch.equal(wrapped.embed(x), net.layer(x)) and wrapper_calls == [1, 1]
    wrapped.mark_forward_method(net.helper)  # a bound method works too
    assert wrapped.helper() == "helped" and wrapper_calls == [1, 1, 1]
    assert "forward" not in net.__dict__, "the redirect was left in place"
    assert wrapped(x).shape == (4, 2) and wrapper_calls == [1, 1, 1, 1]


def test_step_methods_are_redirected_only_where_defined() -> None:
    assert wrap(Net())._forward_methods == {"training_step"}
    assert set(STEP_METHODS) == {"training_step", "validation_step", "test_step", "predict_step"}


def test_mark_forward_method_refuses_unknown_names() -> None:
    wrapped = wrap(Net())
    with pytest.raises(ConfigurationError, match=r"has no method 'embedd'.*embed, helper, training_step"):
        wrapped.mark_forward_method("embedd")
    with pytest.raises(ConfigurationError, match="not needed"):
        wrapped.mark_forward_method("forward")


def test_forward_applies_the_precision() -> None:
    net = Net()
    wrapped = wrap(net, precision="bf16-mixed")
    seen: list[torch.dtype] = []
    net.layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    out = wrapped(torch.ones(2, 3))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32  # autocast inside, float32 outside
    assert wrapped.training_step(torch.ones(2, 3)).dtype == torch.float32 and seen[-1] == torch.bfloat16


def test_module_wrapper_copies_and_pickles() -> None:
    wrapped = wrap(Net())
    for clone in (copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))):
        assert isinstance(clone, FabricModule) and clone.scale == 2.0
        assert clone.module is not wrapped.module and clone.forward_module is clone.module
        assert torch.equal(clone.state_dict()["layer.weight"], wrapped.state_dict()["layer.weight"])


# ---------------------------------------------------------------------- FabricOptimizer
def setup(optimizer_class: type[torch.optim.Optimizer] = torch.optim.SGD, **kwargs: Any) -> tuple[Any, ...]:
    strategy = RecordingStrategy()
    fabric = Fabric(strategy=strategy, callbacks=[StepRecorder()])
    net = Net()
    optimizer = optimizer_class(net.parameters(), **({"lr": 0.1} | kwargs))
    fmodel, foptimizer = fabric.setup(net, optimizer)
    return fabric, strategy, fmodel, foptimizer, optimizer


class StepRecorder:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def on_after_optimizer_step(self, optimizer: Any) -> None:
        self.seen.append(optimizer)


def test_optimizer_wrapper_is_an_instance_of_the_optimizer_class() -> None:
    _, _, _, foptimizer, optimizer = setup(torch.optim.Adam)
    assert isinstance(foptimizer, torch.optim.Adam) and isinstance(foptimizer, FabricOptimizer)
    assert type(foptimizer).__name__ == "FabricAdam" and foptimizer.optimizer is optimizer
    assert repr(foptimizer).startswith("FabricOptimizer(Adam (")


def test_optimizer_wrapper_shares_the_optimizer_state() -> None:
    fabric, _, fmodel, foptimizer, optimizer = setup(momentum=0.9)
    assert foptimizer.param_groups is optimizer.param_groups and foptimizer.state is optimizer.state
    assert foptimizer.defaults is optimizer.defaults
    foptimizer.param_groups[0]["lr"] = 0.5
    assert optimizer.param_groups[0]["lr"] == 0.5
    fabric.backward(fmodel(torch.ones(1, 3)).sum())
    foptimizer.step()
    assert len(optimizer.state) == 2  # momentum buffers, made by the real step
    saved = copy.deepcopy(foptimizer.state_dict())
    assert saved["param_groups"][0]["lr"] == 0.5
    foptimizer.zero_grad()
    assert all(p.grad is None for p in fmodel.parameters())
    foptimizer.param_groups[0]["lr"] = 1.0
    foptimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["lr"] == 0.5
    extra = nn.Parameter(torch.zeros(1))
    foptimizer.add_param_group({"params": [extra], "lr": 0.01})
    assert optimizer.param_groups[1]["params"] == [extra]
    steps: list[int] = []
    foptimizer.register_step_post_hook(lambda *_: steps.append(1))  # reaches the optimizer's own hooks
    foptimizer.step()
    assert steps == [1] and foptimizer._optimizer_step_post_hooks is optimizer._optimizer_step_post_hooks


def test_optimizer_step_goes_through_the_strategy_and_the_callbacks() -> None:
    fabric, strategy, fmodel, foptimizer, optimizer = setup()
    fabric.backward(fmodel(torch.ones(1, 3)).sum())
    before = fmodel.module.layer.weight.detach().clone()
    foptimizer.step()
    assert ("optimizer_step", optimizer, {}) in strategy.calls
    assert not torch.equal(before, fmodel.module.layer.weight)
    assert fabric._callbacks[0].seen == [optimizer]

    def closure() -> Tensor:
        loss: Tensor = fmodel(torch.ones(1, 3)).sum()
        fabric.backward(loss)
        return loss

    assert isinstance(foptimizer.step(closure), Tensor)
    steps = [call for call in strategy.calls if call[0] == "optimizer_step"]
    assert len(steps) == 2 and steps[1][2]["closure"] is closure


def test_lr_schedulers_accept_the_optimizer_wrapper() -> None:
    fabric, _, fmodel, foptimizer, optimizer = setup()
    scheduler = torch.optim.lr_scheduler.StepLR(foptimizer, step_size=1, gamma=0.5)
    fabric.backward(fmodel(torch.ones(1, 3)).sum())
    foptimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_optimizer_wrapper_copies_and_pickles() -> None:
    _, _, _, foptimizer, _ = setup(momentum=0.9)
    for clone in (copy.deepcopy(foptimizer), pickle.loads(pickle.dumps(foptimizer))):
        assert type(clone).__name__ == "FabricSGD" and clone.optimizer is not foptimizer.optimizer
        assert clone.param_groups[0]["momentum"] == 0.9


def test_stepping_an_optimizer_that_was_not_set_up_is_caught() -> None:
    fabric = Fabric(accelerator="cpu")
    net = Net()
    forgotten = torch.optim.SGD(net.parameters(), lr=0.1)
    fmodel = fabric.setup(net)
    fabric.backward(fmodel(torch.ones(1, 3)).sum())
    with pytest.raises(FabricUsageError, match=r"not set up.*fabric\.setup"):
        forgotten.step()
    model2 = Net()
    raw = torch.optim.SGD(model2.parameters(), lr=0.1)
    fmodel2, foptimizer2 = fabric.setup(model2, raw)
    fabric.backward(fmodel2(torch.ones(1, 3)).sum())
    with pytest.raises(FabricUsageError, match="raw optimizer that a FabricOptimizer wraps"):
        raw.step()
    foptimizer2.step()
    plain = Net()  # a plain PyTorch model next to Fabric is left alone
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    plain(torch.ones(1, 3)).sum().backward()
    plain_optimizer.step()


# ---------------------------------------------------------------------- FabricDataLoader
def test_dataloader_wrapper_moves_batches_and_forwards_attributes() -> None:
    strategy = RecordingStrategy()
    loader = DataLoader(numbers(6), batch_size=4)
    wrapped = FabricDataLoader(loader, strategy, torch.device("cpu"))
    assert len(wrapped) == 2 and wrapped.batch_size == 4 and wrapped.dataloader is loader
    assert [batch.tolist() for batch in wrapped] == [[0, 1, 2, 3], [4, 5]]
    assert strategy.names() == ["batch_to_device", "batch_to_device"]
    assert wrapped.device == torch.device("cpu") and "device=device(type='cpu')" in repr(wrapped)
    unmoved = FabricDataLoader(loader, strategy, None)
    assert len(list(unmoved)) == 2 and strategy.names() == ["batch_to_device", "batch_to_device"]


def test_dataloader_wrapper_advances_and_sets_the_sampler_epoch() -> None:
    dataset = numbers(8)
    sampler: DistributedSampler[int] = DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=True, seed=3)
    wrapped = FabricDataLoader(DataLoader(dataset, batch_size=4, sampler=sampler), RecordingStrategy())
    passes = [next(iter(wrapped)).tolist() for _ in range(3)]
    assert sampler.epoch == 2 and passes[0] != passes[1]
    wrapped.set_epoch(0)
    assert next(iter(wrapped)).tolist() == passes[0] and sampler.epoch == 0


def _iterate(loader: FabricDataLoader, queue: Any) -> None:
    try:
        list(loader)
        queue.put("iterated")
    except FabricUsageError as error:
        queue.put(str(error))


def test_dataloader_wrapper_refuses_another_process() -> None:
    wrapped = FabricDataLoader(DataLoader(numbers(4)), RecordingStrategy())
    context = multiprocessing.get_context("fork")
    queue = context.SimpleQueue()
    process = context.Process(target=_iterate, args=(wrapped, queue))
    process.start()
    process.join(timeout=30)
    assert process.exitcode == 0
    message = queue.get()
    assert "set up by fabric.setup_dataloaders in process" in message and "inside the function" in message, message
