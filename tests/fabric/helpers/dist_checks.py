"""What every rank of a 2-process Fabric job checks; run by ``dist_driver.py`` through ``Fabric.launch``.

Many checks share one launch (each process pays seconds to import torch): every rank asserts them
itself, and a failed assertion fails its worker, which fails the launch with that rank's traceback.
"""

from __future__ import annotations

import copy
import datetime
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

from torchloom.core.samplers import DistributedSamplerWrapper
from torchloom.core.strategies.ddp import DDPStrategy
from torchloom.fabric import Fabric, FabricDataLoader

WORLD_SIZE = 2
TIMEOUT = datetime.timedelta(seconds=60)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(6, 8)
        self.layer2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.layer2(torch.tanh(self.layer1(x)))
        return out

    def training_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


class MyDDP(DDPStrategy):
    """The user's own strategy: counts what it set up and every barrier."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.modules_set_up = 0
        self.barriers = 0

    def setup_module(self, module: nn.Module) -> DistributedDataParallel:
        self.modules_set_up += 1
        return super().setup_module(module)

    def barrier(self, name: str | None = None) -> None:
        self.barriers += 1
        super().barrier(name)


class Reversed(Sampler[int]):
    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self) -> Any:
        return iter(range(self.size - 1, -1, -1))

    def __len__(self) -> int:
        return self.size


class StepCounter:
    """A callback: counts optimizer steps."""

    def __init__(self) -> None:
        self.steps = 0

    def on_after_optimizer_step(self, optimizer: Any) -> None:
        self.steps += 1


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write per line: the ranks share stdout


def make_model() -> Net:
    torch.manual_seed(1234)
    return Net()


def global_batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)


def shard(batch: tuple[Tensor, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    return batch[0][rank * 4 : (rank + 1) * 4], batch[1][rank * 4 : (rank + 1) * 4]


def same_on_all_ranks(fabric: Fabric, tensor: Tensor) -> bool:
    gathered = fabric.all_gather(tensor.detach().clone())
    return bool(torch.equal(gathered[0], gathered[1]))


def check_ranks_and_print(fabric: Fabric) -> None:
    rank = fabric.global_rank
    assert fabric.world_size == WORLD_SIZE and fabric.local_rank == rank and fabric.node_rank == 0, fabric
    assert fabric.is_global_zero == (rank == 0) and fabric.device == torch.device("cpu")
    fabric.print(f"PRINTED by rank {rank}")


def check_collectives(fabric: Fabric) -> None:
    rank = fabric.global_rank
    value = torch.tensor([rank + 1.0, 10.0 * (rank + 1)])
    assert torch.equal(fabric.all_reduce(value), torch.tensor([1.5, 15.0]))
    assert torch.equal(fabric.all_reduce(value, reduce_op="max"), torch.tensor([2.0, 20.0]))
    nested = fabric.all_reduce({"a": value, "b": [rank + 1, 0.5 * rank]}, reduce_op="sum")
    assert torch.equal(nested["a"], torch.tensor([3.0, 30.0])), nested
    assert isinstance(nested["b"][0], Tensor) and nested["b"][0].item() == 3 and nested["b"][1].item() == 0.5
    gathered = fabric.all_gather({"x": torch.full((3,), float(rank)), "n": rank})
    assert gathered["x"].shape == (2, 3) and torch.equal(gathered["x"][:, 0], torch.tensor([0.0, 1.0]))
    assert torch.equal(gathered["n"], torch.tensor([0, 1])), gathered
    leaf = torch.full((2,), float(rank + 1), requires_grad=True)
    torch.autograd.backward((fabric.all_gather(leaf, sync_grads=True) * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum())
    assert leaf.grad is not None and torch.equal(leaf.grad, 2 * torch.tensor([[1.0, 2.0], [3.0, 4.0]])[rank])
    assert fabric.broadcast({"from": rank}, src=1) == {"from": 1}
    if rank == 1:
        time.sleep(0.4)
    start = time.monotonic()
    fabric.barrier("test")
    assert rank == 1 or time.monotonic() - start > 0.25, "barrier did not wait for rank 1"


def check_rank_zero_first(fabric: Fabric, out_dir: Path) -> None:
    marker = out_dir / "rank_zero_first.txt"
    for local in (False, True):
        with fabric.rank_zero_first(local=local):
            if fabric.global_rank == 0:
                time.sleep(0.3)
                marker.write_text(f"local={local}")
            else:
                assert marker.read_text() == f"local={local}", "rank 1 entered before rank 0 finished"
        fabric.barrier()


def check_dataloaders(fabric: Fabric) -> None:
    rank = fabric.global_rank
    dataset = TensorDataset(torch.arange(10))
    loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=2, shuffle=True))
    assert isinstance(loader, FabricDataLoader) and len(loader) == 3  # 5 indices per rank, in batches of 2
    sampler = loader.sampler
    assert isinstance(sampler, DistributedSampler) and sampler.shuffle and sampler.seed == 42
    assert (sampler.num_replicas, sampler.rank) == (2, rank), (sampler.num_replicas, sampler.rank)

    def one_epoch() -> Tensor:
        batches = [batch[0] for batch in loader]
        assert all(b.device == fabric.device for b in batches)
        return torch.cat(batches)

    epoch0, epoch1 = one_epoch(), one_epoch()
    gathered = fabric.all_gather(epoch0)
    assert sorted(gathered.flatten().tolist()) == list(range(10)), gathered  # the ranks split the data
    assert not torch.equal(epoch0, epoch1), "the epoch was not advanced between passes"
    loader.set_epoch(0)
    assert torch.equal(one_epoch(), epoch0), "set_epoch(0) did not bring back epoch 0's order"

    custom = fabric.setup_dataloaders(DataLoader(dataset, batch_size=5, sampler=Reversed(10)))
    assert isinstance(custom.sampler, DistributedSamplerWrapper)
    assert next(iter(custom))[0].tolist() == ([9, 7, 5, 3, 1] if rank == 0 else [8, 6, 4, 2, 0])
    kept = fabric.setup_dataloaders(DataLoader(dataset, batch_size=5), use_distributed_sampler=False)
    assert len(kept) == 2, "use_distributed_sampler=False still split the data"


def check_training(fabric: Fabric, out_dir: Path) -> None:
    rank = fabric.global_rank
    model = make_model()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fmodel, foptimizer = fabric.setup(model, optimizer)
    assert isinstance(fmodel.forward_module, DistributedDataParallel)
    assert [name for name, _ in fmodel.named_parameters()] == [name for name, _ in reference.named_parameters()]
    wrapper_calls: list[int] = []
    fmodel.forward_module.register_forward_pre_hook(lambda *_: wrapper_calls.append(1))

    batch = global_batch()
    loss = fmodel.training_step(shard(batch, rank))  # through DDP's forward
    assert wrapper_calls == [1], "training_step did not run through the DDP wrapper"
    fabric.backward(loss)
    norm = fabric.clip_gradients(fmodel, foptimizer, max_norm=1e6)
    assert norm is not None and same_on_all_ranks(fabric, norm.reshape(1)), "gradient norms differ across ranks"
    foptimizer.step()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    torch.autograd.backward(reference.training_step(batch))
    ref_optimizer.step()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        assert same_on_all_ranks(fabric, param), f"{name} differs across ranks"
        torch.testing.assert_close(param.detach(), ref.detach(), rtol=0, atol=1e-6, msg=f"{name} != reference")

    foptimizer.zero_grad()
    with fabric.no_backward_sync(fmodel):
        fabric.backward(fmodel.training_step(shard(batch, rank)))
    local = model.layer1.weight.grad
    assert local is not None and not same_on_all_ranks(fabric, local), "gradients were synced inside no_backward_sync"
    fabric.backward(fmodel.training_step(shard(batch, rank)))
    synced = model.layer1.weight.grad
    assert synced is not None and same_on_all_ranks(fabric, synced), "gradients not synced after no_backward_sync"

    path = out_dir / "checkpoint.pt"
    fabric.save(path, {"model": fmodel, "optimizer": foptimizer, "step": 3})
    if fabric.is_global_zero:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out_dir / "expected.pt")
    fabric.barrier()
    raw = torch.load(path, weights_only=True)
    assert list(raw["model"]) == list(reference.state_dict()), "wrapper prefixes in the saved keys"
    fresh = make_model()
    restored_model, restored_optimizer = fabric.setup(fresh, torch.optim.SGD(fresh.parameters(), lr=1.0))
    state: dict[str, Any] = {"model": restored_model, "optimizer": restored_optimizer, "step": 0}
    assert fabric.load(path, state) == {} and state["step"] == 3
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    loaded, trained = restored_optimizer.state_dict(), optimizer.state_dict()
    assert loaded["param_groups"] == trained["param_groups"], loaded["param_groups"]
    for index, entry in trained["state"].items():
        assert torch.equal(loaded["state"][index]["momentum_buffer"], entry["momentum_buffer"]), index


def check_everything(fabric: Fabric, out_dir: str, counter: StepCounter) -> dict[str, Any]:
    """``counter`` is also among the Fabric's callbacks: spawn pickles both together, so they stay one object."""
    folder = Path(out_dir)
    fabric.seed_everything(42)
    check_ranks_and_print(fabric)
    check_collectives(fabric)
    check_rank_zero_first(fabric, folder)
    check_dataloaders(fabric)
    check_training(fabric, folder)
    fabric.log("loss", torch.tensor(0.5 + fabric.global_rank), step=0)
    fabric.log_dict({"acc": 0.75, "rank": float(fabric.global_rank)}, step=1)
    say(f"CHECKS PASSED rank={fabric.global_rank}")
    return {"rank": fabric.global_rank, "pid": os.getpid(), "steps": counter.steps}


def check_custom_strategy(fabric: Fabric) -> dict[str, Any]:
    strategy = fabric.strategy
    assert isinstance(strategy, MyDDP), type(strategy)
    model, optimizer = fabric.setup(make_model(), torch.optim.SGD(make_model().parameters(), lr=0.1))
    assert strategy.modules_set_up == 1
    fabric.backward(model.training_step(shard(global_batch(), fabric.global_rank)))
    optimizer.step()
    fabric.barrier()
    assert strategy.barriers >= 1 and same_on_all_ranks(fabric, model.layer1.weight)
    return {"rank": fabric.global_rank, "strategy": type(strategy).__name__, "barriers": strategy.barriers}
