"""Checks that run inside every rank of a 2-process DDP job (any launcher), and their single-process oracle.

Used by the worker scripts next to this file and by the tests; both import it as
``tests.integration.helpers.ddp_checks`` (scripts) or ``integration.helpers.ddp_checks`` (pytest).
"""

from __future__ import annotations

import copy
import datetime
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.environments.local import LocalEnvironment
from torchloom.core.strategies.ddp import DDPStrategy
from torchloom.core.strategies.redirection import call_through_forward
from torchloom.core.strategies.single_device import SingleDeviceStrategy

WORLD_SIZE = 2
GLOBAL_BATCH = 8
LR = 0.1


class Net(nn.Module):
    steps: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(6, 8)
        self.layer2 = nn.Linear(8, 3)
        self.register_buffer("steps", torch.zeros(()))
        self.forward_calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.forward_calls += 1
        out: Tensor = self.layer2(torch.tanh(self.layer1(x)))
        return out

    def training_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)  # the nested self() call inside a redirected method


def say(line: str) -> None:
    """One write per line: workers share the stdout pipe, and print's separate newline write interleaves."""
    os.write(1, (line + "\n").encode())


def make_model() -> Net:
    torch.manual_seed(1234)
    return Net()


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)  # momentum: the optimizer has state to checkpoint


def global_batch(seed: int = 7) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(GLOBAL_BATCH, 6, generator=generator), torch.randn(GLOBAL_BATCH, 3, generator=generator)


def shard(batch: tuple[Tensor, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    size = GLOBAL_BATCH // WORLD_SIZE
    return batch[0][rank * size : (rank + 1) * size], batch[1][rank * size : (rank + 1) * size]


def make_strategy(start_method: str, num_nodes: int = 1) -> DDPStrategy:
    strategy = DDPStrategy(
        accelerator=CPUAccelerator(),
        parallel_devices=[torch.device("cpu")] * (WORLD_SIZE // num_nodes),
        cluster_environment=LocalEnvironment(),
        start_method=start_method,
        timeout=datetime.timedelta(seconds=60),
    )
    strategy.num_nodes = num_nodes
    strategy.configure_launcher()
    return strategy


def _same_on_all_ranks(strategy: DDPStrategy, tensor: Tensor) -> bool:
    gathered = strategy.all_gather(tensor)
    return all(torch.equal(gathered[0], gathered[i]) for i in range(1, WORLD_SIZE))


def check_training(strategy: DDPStrategy, model: Net | None, out_dir: Path) -> dict[str, Tensor]:
    rank = strategy.global_rank
    model = model if model is not None else make_model()
    reference = copy.deepcopy(model)
    strategy.module_to_device(model)
    wrapped = strategy.setup_module(model)
    assert isinstance(wrapped, nn.parallel.DistributedDataParallel), type(wrapped)
    optimizer = strategy.setup_optimizer(make_optimizer(wrapped.parameters()))
    batch = global_batch()

    # one step through the wrapper, with training_step redirected through DDP's forward
    wrapper_calls: list[int] = []
    wrapped.register_forward_pre_hook(lambda *_: wrapper_calls.append(1))
    loss = call_through_forward(wrapped, model, "training_step", shard(batch, rank))
    assert wrapper_calls == [1], "training_step did not run through the DDP wrapper"
    assert model.forward_calls == 1, f"the nested self() call ran forward {model.forward_calls} times"
    assert "forward" not in model.__dict__, "call_through_forward left the redirect in place"
    strategy.backward(loss, wrapped)
    norm = strategy.clip_gradients_norm(wrapped, optimizer, max_norm=1e6)  # large: measures, does not clip
    assert _same_on_all_ranks(strategy, norm.reshape(1)), "gradient norms differ across ranks"
    strategy.optimizer_step(optimizer)

    ref_optimizer = make_optimizer(reference.parameters())
    torch.autograd.backward(reference.training_step(batch))
    ref_optimizer.step()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        assert _same_on_all_ranks(strategy, param.detach()), f"{name} differs across ranks"
        torch.testing.assert_close(param.detach(), ref.detach(), rtol=0, atol=1e-6, msg=f"{name} != reference")

    # gradient accumulation: no sync inside no_backward_sync, the next backward syncs the sum
    optimizer.zero_grad()
    with strategy.no_backward_sync(wrapped):
        strategy.backward(call_through_forward(wrapped, model, "training_step", shard(batch, rank)), wrapped)
    local = model.layer1.weight.grad
    assert local is not None and not _same_on_all_ranks(strategy, local.clone()), "grads synced inside no_sync"
    strategy.backward(call_through_forward(wrapped, model, "training_step", shard(batch, rank)), wrapped)
    synced = model.layer1.weight.grad
    assert synced is not None and _same_on_all_ranks(strategy, synced.clone()), "grads not synced after no_sync"
    reference.zero_grad()
    torch.autograd.backward(2 * reference.training_step(batch))
    torch.testing.assert_close(synced, reference.layer1.weight.grad, rtol=0, atol=1e-5)

    model.steps += 1
    # checkpoint: live objects in, plain state (no "module." prefix) out; rank 0 writes
    path = out_dir / "checkpoint.pt"
    strategy.save_checkpoint(path, {"model": wrapped, "optimizer": optimizer, "step": 1})
    if strategy.is_global_zero:
        expected = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        torch.save(copy.deepcopy(expected), out_dir / "expected.pt")
    strategy.barrier()
    restored = make_model()
    wrapped_restored = strategy.setup_module(restored)
    restored_optimizer = make_optimizer(wrapped_restored.parameters())
    state: dict[str, Any] = {"model": wrapped_restored, "optimizer": restored_optimizer, "step": 0}
    remainder = strategy.load_checkpoint(path, state)
    assert remainder == {} and state["step"] == 1, (remainder, state["step"])
    assert_identical(restored.state_dict(), model.state_dict())
    assert_identical(restored_optimizer.state_dict(), optimizer.state_dict())
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def check_collectives(strategy: DDPStrategy) -> None:
    rank = strategy.global_rank
    value = torch.tensor([rank + 1.0, 10.0 * (rank + 1)])
    expected = {
        "mean": [1.5, 15.0],
        "sum": [3.0, 30.0],
        "max": [2.0, 20.0],
        "min": [1.0, 10.0],
        "product": [2.0, 200.0],
    }
    for op, want in expected.items():
        result = strategy.all_reduce(value, reduce_op=op)
        assert torch.equal(result, torch.tensor(want)), (op, result)
    assert torch.equal(value, torch.tensor([rank + 1.0, 10.0 * (rank + 1)])), "all_reduce modified its input"
    nested = strategy.all_reduce({"a": value, "b": [torch.tensor(rank), rank + 1, 0.5 * rank]}, reduce_op="sum")
    assert torch.equal(nested["a"], torch.tensor([3.0, 30.0])), nested
    assert nested["b"][0].item() == 1 and nested["b"][1] == 3 and nested["b"][2] == 0.5, nested
    assert isinstance(nested["b"][1], int) and isinstance(nested["b"][2], float), nested
    assert strategy.all_reduce(rank + 1) == 1.5  # mean of python ints

    gathered = strategy.all_gather({"x": torch.full((3,), float(rank)), "y": {"z": torch.tensor(rank)}})
    assert gathered["x"].shape == (2, 3) and torch.equal(gathered["x"][:, 0], torch.tensor([0.0, 1.0])), gathered
    assert torch.equal(gathered["y"]["z"], torch.tensor([0, 1])), gathered

    leaf = torch.full((2,), float(rank + 1), requires_grad=True)
    weights = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    torch.autograd.backward((strategy.all_gather(leaf, sync_grads=True) * weights).sum())
    # every rank's loss uses this rank's row, so the gradient is the row summed over ranks
    assert leaf.grad is not None and torch.equal(leaf.grad, WORLD_SIZE * weights[rank]), leaf.grad

    sent = {"from": rank, "payload": [1, "two", (3.0,)]}
    assert strategy.broadcast(sent, src=0) == {"from": 0, "payload": [1, "two", (3.0,)]}
    assert strategy.broadcast(sent, src=1)["from"] == 1

    if rank == 1:
        time.sleep(0.5)
    start = time.monotonic()
    strategy.barrier("test")
    if rank == 0:
        assert time.monotonic() - start > 0.3, "barrier did not wait for rank 1"

    assert strategy.reduce_boolean_decision(rank == 0, all=True) is False
    assert strategy.reduce_boolean_decision(rank == 0, all=False) is True
    assert strategy.reduce_boolean_decision(True, all=True) is True
    assert strategy.reduce_boolean_decision(False, all=False) is False
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": rank}


def run_checks(strategy: DDPStrategy, out_dir: str, model: Net | None = None) -> dict[str, Any]:
    """Everything a DDP rank must get right; returns rank info and the trained parameters."""
    strategy.setup_environment()  # a second call (the launcher may have made one) must change nothing
    assert dist.is_initialized() and dist.get_world_size() == WORLD_SIZE
    rank = strategy.global_rank
    assert rank == dist.get_rank() and strategy.world_size == WORLD_SIZE, (rank, strategy.world_size)
    say(f"WORKER rank={rank} local_rank={strategy.local_rank} world_size={strategy.world_size}")
    check_collectives(strategy)
    params = check_training(strategy, model, Path(out_dir))
    strategy.teardown()
    assert not dist.is_initialized(), "teardown left the process group"
    say(f"CHECKS PASSED rank={rank}")
    return {"rank": rank, "world_size": WORLD_SIZE, "params": params, "pid": os.getpid()}


def report_node(strategy: DDPStrategy) -> None:
    """One worker per node: the two nodes' workers must form one group of two."""
    strategy.setup_environment()
    total = strategy.all_reduce(torch.tensor([10.0**strategy.global_rank]), reduce_op="sum")
    say(
        f"NODE rank={strategy.global_rank} node_rank={strategy.node_rank} world_size={strategy.world_size} "
        f"sum={total.item()}"
    )
    strategy.teardown()


def fail(strategy: DDPStrategy, mode: str) -> None:
    """Rank 1 raises or dies by SIGKILL while rank 0 waits in a collective that can never finish."""
    strategy.setup_environment()
    if strategy.global_rank == 1:
        time.sleep(0.5)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError("boom from rank 1")
    if mode == "raise":
        strategy.all_reduce(torch.ones(1))  # rank 1 never joins: gloo fails this rank a moment after rank 1
        return
    try:
        strategy.all_reduce(torch.ones(1))
    except RuntimeError:
        pass  # gloo noticed the dead peer; stay alive, so that only the launcher can stop this rank
    time.sleep(120)


def verify_checkpoint(out_dir: str) -> None:
    """Loads the DDP checkpoint into a plain single-device run and compares every tensor."""
    assert not dist.is_initialized()
    strategy = SingleDeviceStrategy("cpu", accelerator=CPUAccelerator())
    raw = torch.load(Path(out_dir) / "checkpoint.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in raw["model"]), list(raw["model"])
    model = make_model()
    optimizer = make_optimizer(model.parameters())
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
    assert strategy.load_checkpoint(Path(out_dir) / "checkpoint.pt", state) == {}
    expected = torch.load(Path(out_dir) / "expected.pt", weights_only=True)
    assert_identical(model.state_dict(), expected["model"])
    assert_identical(optimizer.state_dict(), expected["optimizer"])
    assert state["step"] == 1


def assert_identical(actual: Any, expected: Any, where: str = "state") -> None:
    """Nested dicts/lists of tensors and plain values, compared exactly."""
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor) and torch.equal(actual, expected), f"{where} differs"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), f"{where} keys differ"
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where} lengths differ"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_identical(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"
