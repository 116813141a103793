"""Single-process tests of the strategy family and the collective helpers (multi-rank runs: tests/integration)."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import SequentialSampler

from tests.processes import explain, run_python
from torchloom.core import distributed, samplers
from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.environments.local import LocalEnvironment, find_free_port
from torchloom.core.errors import ConfigurationError
from torchloom.core.launchers.multiprocessing import MultiprocessingLauncher
from torchloom.core.launchers.subprocess_script import SubprocessScriptLauncher
from torchloom.core.precision.amp import MixedPrecision
from torchloom.core.precision.precision import Precision
from torchloom.core.registry import STRATEGIES
from torchloom.core.strategies import DDPStrategy, ParallelStrategy, SingleDeviceStrategy, call_through_forward
from torchloom.core.strategies import ddp as ddp_module
from torchloom.core.utils import rank_zero


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)
        self.forward_calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.forward_calls += 1
        out: Tensor = self.layer(x)
        return out

    def training_step(self, x: Tensor, scale: float = 1.0) -> Tensor:
        out: Tensor = self(x).sum() * scale  # nested self() call
        return out

    def failing_step(self, x: Tensor) -> Tensor:
        raise RuntimeError("step failed")


class Wrapper(nn.Module):
    """Stands in for DDP/FSDP: its forward runs extra code, then the inner module."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.module(*args, **kwargs)


def cpu_strategy(**kwargs: Any) -> SingleDeviceStrategy:
    return SingleDeviceStrategy("cpu", accelerator=CPUAccelerator(), **kwargs)


def ddp_strategy(num_processes: int = 2, **kwargs: Any) -> DDPStrategy:
    return DDPStrategy(
        accelerator=CPUAccelerator(),
        parallel_devices=[torch.device("cpu")] * num_processes,
        cluster_environment=LocalEnvironment(),
        **kwargs,
    )


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.setenv(name, "")  # recorded, so that whatever a test sets is undone afterwards
        monkeypatch.delenv(name)


# ---------------------------------------------------------------------- single device
def test_single_device_trains_like_plain_pytorch() -> None:
    strategy = cpu_strategy()
    strategy.setup_environment()
    assert strategy.root_device == torch.device("cpu") and strategy.world_size == 1 and strategy.is_global_zero
    assert strategy.launcher is None and strategy.distributed_sampler_kwargs is None
    torch.manual_seed(0)
    model = Net()
    plain = copy.deepcopy(model)
    module, optimizers, _ = strategy.setup_module_and_optimizers(model, [torch.optim.SGD(model.parameters(), lr=0.1)])
    strategy.module_to_device(module)
    batch = strategy.batch_to_device({"x": torch.randn(3, 4)})
    strategy.backward(model.training_step(batch["x"]), module)
    strategy.optimizer_step(optimizers[0])
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    torch.autograd.backward(plain.training_step(batch["x"]))
    plain_optimizer.step()
    for ours, theirs in zip(model.parameters(), plain.parameters()):
        assert torch.equal(ours, theirs)


def test_single_device_collectives_are_identities() -> None:
    strategy = cpu_strategy()
    value = torch.tensor([1.0, 2.0])
    assert strategy.all_reduce(value) is value
    assert strategy.all_gather({"a": value})["a"].shape == (1, 2)
    assert strategy.broadcast({"x": 1}) == {"x": 1}
    strategy.barrier("noop")
    assert strategy.reduce_boolean_decision(False) is False
    with strategy.no_backward_sync(nn.Linear(1, 1)):
        pass


@pytest.mark.parametrize("precision", [None, "16-mixed"])
def test_gradient_clipping_by_norm_and_value(precision: str | None) -> None:
    torch.manual_seed(0)
    mixed = MixedPrecision("16-mixed", device_type="cpu") if precision else None
    strategy = cpu_strategy(precision=mixed)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4) * 10
    reference = copy.deepcopy(model)
    torch.autograd.backward(reference(x).pow(2).sum())
    expected_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters() if p.grad is not None])

    strategy.backward(model(x).pow(2).sum(), model)
    if mixed is not None:  # the loss was scaled up for backward
        assert mixed.scaler is not None and mixed.scaler.get_scale() > 1
    norm = strategy.clip_gradients_norm(model, optimizer, max_norm=1.0)
    # with a grad scaler the gradients were unscaled first: the norm is the true one
    torch.testing.assert_close(norm, expected_norm, rtol=1e-4, atol=0)
    clipped = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    assert clipped.item() == pytest.approx(1.0, rel=1e-3)
    strategy.optimizer_step(optimizer)

    optimizer.zero_grad()
    strategy.backward(model(x).pow(2).sum(), model)
    strategy.clip_gradients_value(model, optimizer, clip_val=0.01)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert grads.abs().max().item() == pytest.approx(0.01) and grads.abs().min().item() > 0
    strategy.optimizer_step(optimizer)  # a scaler accepts the unscaled-then-clipped step


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    strategy = cpu_strategy()
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters())
    strategy.backward(model.training_step(torch.randn(2, 4)), model)
    optimizer.step()
    path = tmp_path / "ckpt.pt"
    strategy.save_checkpoint(path, {"model": model, "optimizer": optimizer, "epoch": 3, "extra": [1, 2]})
    assert set(torch.load(path, weights_only=True)["model"]) == {"layer.weight", "layer.bias"}

    fresh = Net()
    fresh_optimizer = torch.optim.Adam(fresh.parameters())
    state: dict[str, Any] = {"model": fresh, "optimizer": fresh_optimizer, "epoch": 0}
    remainder = strategy.load_checkpoint(path, state)
    assert remainder == {"extra": [1, 2]} and state["epoch"] == 3
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    saved_state = optimizer.state_dict()["state"]
    assert all(torch.equal(fresh_optimizer.state_dict()["state"][0][k], v) for k, v in saved_state[0].items())

    with pytest.raises(KeyError, match="missing"):
        strategy.load_checkpoint(path, {"missing": 1})
    assert strategy.load_checkpoint(path, {"missing": 1}, strict=False) != {}
    strategy.remove_checkpoint(path)
    assert not path.exists()


def test_a_list_of_optimizers_saves_and_loads_each(tmp_path: Path) -> None:
    strategy = cpu_strategy()
    torch.manual_seed(0)
    model = Net()
    optimizers = [torch.optim.Adam(model.layer.parameters(), lr=0.1), torch.optim.SGD([model.layer.bias], momentum=0.9)]
    strategy.backward(model.training_step(torch.randn(2, 4)), model)
    for optimizer in optimizers:
        optimizer.step()
    path = tmp_path / "ckpt.pt"
    strategy.save_checkpoint(path, {"model": model, "optimizers": optimizers})
    assert [sorted(s["state"][0]) for s in torch.load(path, weights_only=True)["optimizers"]] == [
        ["exp_avg", "exp_avg_sq", "step"],
        ["momentum_buffer"],
    ]
    fresh = Net()
    fresh_optimizers = [torch.optim.Adam(fresh.layer.parameters()), torch.optim.SGD([fresh.layer.bias])]
    state: dict[str, Any] = {"model": fresh, "optimizers": fresh_optimizers}
    strategy.load_checkpoint(path, state)
    assert state["optimizers"] is fresh_optimizers  # loaded into, not replaced
    for saved, loaded in zip(optimizers, fresh_optimizers, strict=True):
        assert loaded.param_groups[0]["lr"] == saved.param_groups[0]["lr"]
        for key, value in saved.state_dict()["state"][0].items():
            assert torch.equal(loaded.state_dict()["state"][0][key], value)


def test_empty_init_skips_initialisation() -> None:
    strategy = cpu_strategy()
    torch.manual_seed(0)
    with strategy.module_init_context(empty_init=False):
        nn.Linear(64, 64)
    after_normal_init = torch.get_rng_state()
    torch.manual_seed(0)
    with strategy.module_init_context(empty_init=True):
        layer = nn.Linear(64, 64)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state()), "init drew random numbers"
    assert not torch.equal(after_normal_init, torch.get_rng_state())
    assert layer.weight.shape == (64, 64) and layer.weight.device.type == "cpu"


# ---------------------------------------------------------------------- forward redirection
def test_call_through_forward_runs_the_method_inside_the_wrapper() -> None:
    model = Net()
    wrapper = Wrapper(model)
    x = torch.randn(2, 4)
    out = call_through_forward(wrapper, model, "training_step", x, scale=2.0)
    assert wrapper.calls == 1 and model.forward_calls == 1
    torch.testing.assert_close(out, model.layer(x).sum() * 2.0)
    assert "forward" not in model.__dict__
    assert torch.equal(model(x), model.layer(x))  # forward is the real one again


def test_call_through_forward_restores_forward_after_an_error_and_without_a_wrapper() -> None:
    model = Net()
    custom = model.forward
    model.forward = custom  # type: ignore[method-assign]  # an instance-level forward must survive
    with pytest.raises(RuntimeError, match="step failed"):
        call_through_forward(Wrapper(model), model, "failing_step", torch.randn(1, 4))
    assert model.__dict__["forward"] is custom
    assert call_through_forward(model, model, "training_step", torch.zeros(1, 4)).shape == ()


# ---------------------------------------------------------------------- parallel / DDP wiring
def test_ddp_strategy_wiring_and_launcher_choice(clean_env: None) -> None:
    strategy = ddp_strategy(3)
    assert strategy.start_method == "popen" and strategy.num_processes == 3
    assert strategy.process_group_backend == "gloo" and strategy.timeout == datetime.timedelta(minutes=30)
    strategy.configure_launcher()
    assert isinstance(strategy.launcher, SubprocessScriptLauncher)
    assert not strategy.launcher.is_interactive_compatible
    for method, interactive in (("spawn", False), ("fork", True), ("notebook", True)):
        other = ddp_strategy(start_method=method, process_group_backend="mpi")
        other.configure_launcher()
        assert isinstance(other.launcher, MultiprocessingLauncher)
        assert other.launcher.is_interactive_compatible is interactive
        assert other.process_group_backend == "mpi"
    assert "start_method='popen'" in repr(strategy)


@pytest.mark.parametrize(
    ("name", "method"), [("ddp", "popen"), ("ddp_spawn", "spawn"), ("ddp_fork", "fork"), ("ddp_notebook", "notebook")]
)
def test_registered_ddp_names(name: str, method: str) -> None:
    strategy = STRATEGIES.get(name)
    assert isinstance(strategy, DDPStrategy) and strategy.start_method == method
    assert isinstance(STRATEGIES.get("single_device"), SingleDeviceStrategy)


def test_bad_arguments_name_the_valid_choices() -> None:
    with pytest.raises(ConfigurationError, match=r"start_method='thread'.*'popen', 'spawn', 'fork', 'notebook'"):
        DDPStrategy(start_method="thread")
    with pytest.raises(ConfigurationError, match="timeout"):
        DDPStrategy(timeout=datetime.timedelta(0))
    with pytest.raises(ConfigurationError, match="num_nodes=0"):
        DDPStrategy().num_nodes = 0
    with pytest.raises(ConfigurationError, match="parallel_devices"):
        DDPStrategy().root_device  # noqa: B018
    with (
        pytest.raises(ConfigurationError, match="a DistributedDataParallel"),
        ddp_strategy().no_backward_sync(nn.Linear(1, 1)),
    ):
        pass
    with ddp_strategy().no_backward_sync(nn.Linear(1, 1), enabled=False):
        pass


def test_set_world_ranks_from_node_and_local_rank(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_RANK", "1")
    strategy = ddp_strategy(2)
    strategy.num_nodes = 2
    strategy.local_rank = 1
    strategy.set_world_ranks()
    try:
        assert (strategy.global_rank, strategy.world_size, strategy.node_rank) == (3, 4, 1)
        assert strategy.distributed_sampler_kwargs == {"num_replicas": 4, "rank": 3}
        assert strategy.root_device == torch.device("cpu") and not strategy.is_global_zero
        assert rank_zero.global_rank() == 3
    finally:
        rank_zero.set_global_rank(0)


def test_cuda_device_ids_are_passed_to_ddp(monkeypatch: pytest.MonkeyPatch) -> None:
    captured: dict[str, Any] = {}

    def fake_ddp(module: nn.Module, **kwargs: Any) -> nn.Module:
        captured.update(kwargs)
        return module

    monkeypatch.setattr(ddp_module, "DistributedDataParallel", fake_ddp)
    strategy = DDPStrategy(parallel_devices=[torch.device("cuda", 0), torch.device("cuda", 1)], static_graph=True)
    strategy.local_rank = 1
    strategy.setup_module(nn.Linear(1, 1))
    assert captured == {"device_ids": [1], "static_graph": True}
    cpu = ddp_strategy()
    cpu.setup_module(nn.Linear(1, 1))
    assert captured["device_ids"] is None


def test_single_rank_process_group_lifecycle(clean_env: None) -> None:
    """A real gloo group of one: setup creates it (idempotently), collectives use it, teardown destroys it."""
    strategy = ddp_strategy(1, timeout=datetime.timedelta(seconds=30))
    strategy.setup_environment()
    strategy.setup_environment()
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1
        model = strategy.setup_module(nn.Linear(2, 2))
        assert isinstance(model, nn.parallel.DistributedDataParallel)
        assert set(strategy.get_module_state_dict(model)) == {"weight", "bias"}
        with strategy.no_backward_sync(model):
            model(torch.ones(1, 2)).sum().backward()
        reduced = strategy.all_reduce({"v": torch.tensor([2.0]), "n": 3}, reduce_op="max")
        assert torch.equal(reduced["v"], torch.tensor([2.0])) and reduced["n"] == 3
        assert strategy.all_gather(torch.ones(2)).shape == (1, 2)
        assert strategy.broadcast(["anything"]) == ["anything"]
        assert strategy.reduce_boolean_decision(True) is True
        strategy.barrier()
    finally:
        strategy.teardown()
    assert not dist.is_initialized()


_TEARDOWN_CYCLES = """
import datetime, sys
import torch
from torch import nn
from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.environments.local import LocalEnvironment
from torchloom.core.strategies import DDPStrategy

for cycle in range(int(sys.argv[1])):
    strategy = DDPStrategy(
        accelerator=CPUAccelerator(),
        parallel_devices=[torch.device("cpu")],
        cluster_environment=LocalEnvironment(),
        timeout=datetime.timedelta(seconds=30),
    )
    strategy.setup_environment()
    model = strategy.setup_module(nn.Linear(2, 2))
    strategy.all_gather(torch.ones(2))
    strategy.teardown()
    del model  # the DDP wrapper outlives its process group, as a user's variable does
print("cycles done")
"""


def test_a_ddp_wrapper_outliving_its_process_group_never_deadlocks(tmp_path: Path) -> None:
    """Freeing a wrapper right after teardown used to join gloo's threads under the GIL they waited for."""
    script = tmp_path / "cycles.py"
    script.write_text(_TEARDOWN_CYCLES)
    process = run_python(script, "100", timeout=120)
    assert process.returncode == 0 and "cycles done" in process.stdout, explain(process)


def test_at_exit_a_group_torchloom_made_is_destroyed_and_a_users_is_left(clean_env: None) -> None:
    port = LocalEnvironment().main_port
    timeout = datetime.timedelta(seconds=30)
    assert distributed.init_process_group(
        "gloo", rank=0, world_size=1, timeout=timeout, main_address="127.0.0.1", main_port=port
    )
    distributed.all_reduce(torch.ones(1))
    distributed._release_groups_at_exit()
    assert not dist.is_initialized() and not distributed._retired_groups
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}", rank=0, world_size=1)
    try:
        distributed._release_groups_at_exit()
        assert dist.is_initialized()  # the user's own group: theirs to end
    finally:
        dist.destroy_process_group()


def test_teardown_keeps_a_process_group_it_did_not_create(clean_env: None) -> None:
    port = LocalEnvironment().main_port
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        strategy = ddp_strategy(1)
        strategy.setup_environment()
        strategy.teardown()
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_parallel_strategy_is_the_shared_base() -> None:
    assert issubclass(DDPStrategy, ParallelStrategy)


# ---------------------------------------------------------------------- collective helpers
def test_reduce_op_parsing() -> None:
    assert distributed.parse_reduce_op("mean") == (dist.ReduceOp.SUM, True)
    assert distributed.parse_reduce_op("SUM") == (dist.ReduceOp.SUM, False)
    assert distributed.parse_reduce_op("prod") == (dist.ReduceOp.PRODUCT, False)
    assert distributed.parse_reduce_op(dist.ReduceOp.MAX) == (dist.ReduceOp.MAX, False)
    with pytest.raises(ConfigurationError, match=r"reduce_op='median'.*'mean', 'sum', 'max', 'min', 'product'"):
        distributed.parse_reduce_op("median")
    with pytest.raises(ConfigurationError, match="reduce_op='median'"):  # validated even without a group
        distributed.all_reduce(torch.ones(1), reduce_op="median")


def test_helpers_without_a_process_group() -> None:
    assert not distributed.is_distributed()
    data = {"a": torch.ones(2), "b": [3, 4.5]}
    assert distributed.all_reduce(data, "sum") is data
    assert distributed.all_gather(data)["a"].shape == (1, 2)
    assert distributed.broadcast_object("x") == "x"
    assert distributed.reduce_boolean_decision(True, all=False) is True
    distributed.barrier()


def test_distributed_sampler_wrapper_splits_a_custom_sampler() -> None:
    sampler = SequentialSampler(range(10))
    shares = [list(samplers.DistributedSamplerWrapper(sampler, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert shares == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    shuffled = [samplers.DistributedSamplerWrapper(sampler, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for wrapper in shuffled:
        wrapper.set_epoch(1)
    first, second = (list(w) for w in shuffled)
    assert sorted(first + second) == list(range(10)) and len(first) == len(shuffled[0]) == 5
    with pytest.raises(ConfigurationError, match="length"):
        samplers.DistributedSamplerWrapper(iter(range(3)), num_replicas=2, rank=0)  # type: ignore[arg-type]


def test_clipping_an_inf_gradient_raises_except_where_a_grad_scaler_skips_the_step() -> None:
    def clip_with(precision: Precision) -> torch.Tensor:
        strategy = SingleDeviceStrategy("cpu", accelerator=CPUAccelerator(), precision=precision)
        layer = nn.Linear(2, 2)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        layer.weight.grad = torch.full_like(layer.weight, float("inf"))
        precision.pre_backward(torch.tensor(1.0), layer)  # a step's loss scaling starts the scaler
        return strategy.clip_gradients_norm(layer, optimizer, max_norm=1.0)

    with pytest.raises(RuntimeError, match="non-finite"):
        clip_with(Precision())
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_with(MixedPrecision("bf16-mixed"))  # no scaler: nothing would skip this step
    assert not torch.isfinite(clip_with(MixedPrecision("16-mixed")))  # the scaler will skip it


def test_deepspeed_without_the_package_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused when the strategy is built (before any process starts), with the pip line of the extra."""
    from torchloom.core.connector import Connector
    from torchloom.core.errors import MissingDependencyError
    from torchloom.core.strategies.deepspeed import DeepSpeedStrategy
    from torchloom.core.utils import imports

    monkeypatch.setattr(imports, "is_available", lambda module: module != "deepspeed")
    with pytest.raises(MissingDependencyError, match=r"pip install 'torchloom-core\[deepspeed\]'"):
        DeepSpeedStrategy()
    with pytest.raises(MissingDependencyError, match=r"torchloom-core\[deepspeed\]"):
        Connector(accelerator="cpu", devices=2, strategy="deepspeed_stage_3").resolve()
