"""The multi-replica XLAStrategy and XLALauncher with torch-xla's multi-replica calls replaced by fakes (XLA on
the CPU cannot run collectives across replicas: pytorch/xla#9089). Runs everywhere, torch-xla or not."""

from __future__ import annotations

import importlib.machinery
import pickle
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from torchloom.core import Connector
from torchloom.core.accelerators import xla as xla_accelerator
from torchloom.core.accelerators.xla import XLAAccelerator
from torchloom.core.environments.xla import XLAEnvironment
from torchloom.core.errors import WorkerFailedError
from torchloom.core.launchers.xla import XLALauncher
from torchloom.core.strategies.xla import XLAStrategy
from torchloom.core.utils import rank_zero


class FakeXLA:
    """Two replicas as torch-xla's runtime would report them to replica ``rank``; records the calls made."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rank = 1
        self.world = 2
        self.calls: list[tuple[str, Any]] = []
        self.payloads: dict[int, bytes] = {}
        self.monkeypatch = monkeypatch
        self.module("torch_xla", device=lambda: torch.device("xla", 0), sync=lambda: self.calls.append(("sync", None)))
        self.module("torch_xla.launch", None)
        sys.modules["torch_xla"].launch = self.launch  # type: ignore[attr-defined]
        self.module(
            "torch_xla.runtime",
            world_size=lambda: self.world,
            global_ordinal=lambda: self.rank,
            local_ordinal=lambda: self.rank,
            host_index=lambda: 0,
        )
        self.module(
            "torch_xla.core.xla_model",
            REDUCE_SUM="sum",
            REDUCE_MAX="max",
            REDUCE_MIN="min",
            all_reduce=self.all_reduce,
            all_gather=self.all_gather,
            rendezvous=self.rendezvous,
            reduce_gradients=lambda optimizer: self.calls.append(("reduce_gradients", optimizer)),
            optimizer_step=self.optimizer_step,
        )
        monkeypatch.setattr(xla_accelerator, "is_available", lambda module: True)

    def module(self, name: str, _: Any = None, **attributes: Any) -> None:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        for key, value in attributes.items():
            setattr(mod, key, value)
        self.monkeypatch.setitem(sys.modules, name, mod)

    # each replica holds the same tensor: a sum over replicas is world x the tensor
    def all_reduce(self, kind: str, tensor: torch.Tensor, scale: float = 1.0, groups: Any = None) -> torch.Tensor:
        self.calls.append(("all_reduce", (kind, scale)))
        return tensor * (self.world if kind == "sum" else 1) * scale

    def all_gather(self, tensor: torch.Tensor, dim: int = 0, groups: Any = None) -> torch.Tensor:
        self.calls.append(("all_gather", dim))
        return torch.cat([tensor] * self.world, dim=dim)

    def rendezvous(self, tag: str, payload: bytes = b"") -> list[bytes]:
        self.calls.append(("rendezvous", tag))
        self.payloads[self.rank] = payload
        return [self.payloads.get(rank, b"") for rank in range(self.world)]

    def optimizer_step(self, optimizer: Any, barrier: bool = False, optimizer_args: Any = None) -> Any:
        self.calls.append(("optimizer_step", barrier))
        return optimizer.step(**(optimizer_args or {}))

    def launch(self, fn: Callable[..., None], args: tuple[Any, ...] = (), start_method: str = "spawn") -> None:
        self.calls.append(("launch", start_method))
        for rank in reversed(range(self.world)):  # rank 1 first: rank 0's result must still be the one returned
            self.rank = rank
            fn(rank, *args)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeXLA]:
    rank = rank_zero.global_rank()
    yield FakeXLA(monkeypatch)
    rank_zero.set_global_rank(rank)  # a fake replica's setup_environment set this process's rank


def strategy_in_worker(fake: FakeXLA) -> XLAStrategy:
    strategy = XLAStrategy(accelerator=XLAAccelerator(), parallel_devices=[torch.device("xla", i) for i in range(2)])
    strategy._device = torch.device("cpu")  # the fakes compute on the CPU
    return strategy


def test_the_connector_builds_it_without_starting_the_runtime(monkeypatch: pytest.MonkeyPatch, fake: FakeXLA) -> None:
    monkeypatch.setattr(XLAAccelerator, "auto_device_count", staticmethod(lambda: 2))
    setup = Connector(accelerator="tpu", devices="auto").resolve()  # 'auto' picks 'xla' for several devices
    assert type(setup.strategy) is XLAStrategy
    assert type(setup.strategy.cluster_environment) is XLAEnvironment  # whatever was detected
    assert type(setup.launcher) is XLALauncher
    assert setup.devices == [torch.device("xla", 0), torch.device("xla", 1)]
    assert setup.precision.name == "32-true" and type(setup.precision).__name__ == "XLAPrecision"
    assert fake.calls == []  # ranks are the runtime's, asked only inside the workers


def test_ranks_and_sampler_come_from_the_runtime(fake: FakeXLA) -> None:
    strategy = strategy_in_worker(fake)
    assert (strategy.global_rank, strategy.world_size, strategy.is_global_zero) == (1, 2, False)
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 1}


def test_collectives_go_through_torch_xla(fake: FakeXLA) -> None:
    strategy = strategy_in_worker(fake)
    assert torch.equal(strategy.all_reduce(torch.tensor([2.0, 4.0])), torch.tensor([2.0, 4.0]))  # mean
    assert ("all_reduce", ("sum", 0.5)) in fake.calls
    assert torch.equal(strategy.all_reduce(torch.tensor([1.0]), reduce_op="sum"), torch.tensor([2.0]))
    assert strategy.all_gather(torch.tensor([3.0])).shape == (2, 1)  # stacked on a new first dimension
    fake.payloads[0] = pickle.dumps({"from": 0})  # what rank 0 sent
    assert strategy.broadcast({"from": 1}, src=0) == {"from": 0}
    strategy.barrier("saved")
    assert ("rendezvous", "saved") in fake.calls
    assert strategy.reduce_boolean_decision(True) is True
    with pytest.raises(Exception, match="reduce_op='product' is not valid here"):
        strategy.all_reduce(torch.tensor([1.0]), reduce_op="product")


def test_gradients_are_averaged_once_per_step_and_before_clipping(fake: FakeXLA) -> None:
    strategy = strategy_in_worker(fake)
    module = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module(torch.ones(1, 2)).sum().backward()
    strategy.optimizer_step(optimizer)  # no clipping: xm.optimizer_step averages and cuts the graph
    assert [name for name, _ in fake.calls] == ["optimizer_step"] and fake.calls[0][1] is True
    fake.calls.clear()
    module(torch.ones(1, 2)).sum().backward()
    strategy.clip_gradients_norm(module, optimizer, max_norm=1.0)
    strategy.clip_gradients_value(module, optimizer, clip_val=1.0)  # already averaged: not again
    strategy.optimizer_step(optimizer)
    assert [name for name, _ in fake.calls] == ["reduce_gradients", "sync"]
    with strategy.no_backward_sync(module):  # nothing to skip: backward never syncs
        pass


def test_the_launcher_runs_every_replica_and_returns_rank_zero_result(fake: FakeXLA) -> None:
    strategy = XLAStrategy(accelerator=XLAAccelerator(), parallel_devices=[torch.device("xla", i) for i in range(2)])
    seen: list[tuple[int, int]] = []

    def work(tag: str) -> tuple[str, int]:
        seen.append((strategy.global_rank, strategy.local_rank))
        return tag, strategy.global_rank

    assert XLALauncher(strategy).launch(work, "done") == ("done", 0)
    assert seen == [(1, 1), (0, 0)]
    assert ("launch", "spawn") in fake.calls


def test_a_failing_replica_fails_the_launch(fake: FakeXLA) -> None:
    strategy = XLAStrategy(accelerator=XLAAccelerator(), parallel_devices=[torch.device("xla", i) for i in range(2)])

    def work() -> None:
        raise RuntimeError(f"replica {strategy.global_rank} broke")

    with pytest.raises(WorkerFailedError, match="An XLA worker failed: RuntimeError: replica 1 broke"):
        XLALauncher(strategy).launch(work)
