"""What every rank of the 2-process sharded Fabric jobs checks; run by ``sharded_driver.py`` through ``Fabric.launch``.

Each rank asserts everything itself: a failed assertion fails its worker, and so the launch and the driver.
The reference for training is plain single-process PyTorch on the whole batch, run on every rank.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.sharded_models import Net, full, full_params
from torchloom.fabric import Fabric, FabricUsageError

WORLD = 2
STEPS = 3
LR = 0.01
MAX_NORM = 0.05
TIMEOUT = datetime.timedelta(seconds=60)


def dataset(size: int = 8 * STEPS, seed: int = 100) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(size, 4, generator=generator), torch.randn(size, 3, generator=generator))


def assert_close(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float) -> None:
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for name, value in expected.items():
        assert torch.allclose(actual[name], value, atol=atol, rtol=0), (name, (actual[name] - value).abs().max())


def is_sharded(param: Tensor) -> bool:
    return hasattr(param, "placements")


# ---------------------------------------------------------------------- FSDP: sharded checkpoints (default)
def check_fsdp(fabric: Fabric, folder: str) -> dict[str, Any]:
    out = Path(folder)
    rank = fabric.global_rank
    assert fabric.world_size == WORLD

    # meta-device init: nothing is allocated while the model is built; the optimizer is made before sharding
    fabric.seed_everything(0)
    with fabric.init_module(empty_init=True):
        model = Net()
    assert all(p.is_meta for p in model.parameters()), "init_module(empty_init=True) must build on the meta device"
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    fmodel, foptimizer = fabric.setup(model, optimizer)
    assert not any(p.is_meta for p in fmodel.parameters())
    assert [id(p) for p in foptimizer.param_groups[0]["params"]] == [id(p) for p in fmodel.parameters()]
    # each rank holds only its dim-0 chunk of every parameter: about half of the model
    local_numel = total_numel = 0
    for name, param in fmodel.named_parameters():
        shard = param.to_local()
        chunk = -(-param.shape[0] // WORLD)
        assert shard.shape[0] == min(chunk, max(param.shape[0] - rank * chunk, 0)), (name, shard.shape)
        local_numel += shard.numel()
        total_numel += param.numel()
    assert 0.4 < local_numel / total_numel < 0.6, (local_numel, total_numel)
    assert fabric.all_reduce(local_numel, reduce_op="sum").item() == total_numel
    # the shards together are the model a normal init after the same seed gives
    torch.manual_seed(0)
    reference = Net()
    assert_close(full_params(fmodel), dict(reference.named_parameters()), atol=0)

    # training through the Fabric loop == plain PyTorch on the whole batch, clipping by the global norm
    loader = fabric.setup_dataloaders(DataLoader(dataset(), batch_size=4, shuffle=False))
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=LR)
    whole = DataLoader(dataset(), batch_size=4 * WORLD, shuffle=False)
    norms = []
    for (inputs, targets), (all_inputs, all_targets) in zip(loader, whole, strict=True):
        assert torch.equal(inputs, all_inputs[rank::WORLD])  # the distributed sampler's share
        fabric.backward(nn.functional.mse_loss(fmodel(inputs), targets))
        norm = fabric.clip_gradients(fmodel, foptimizer, max_norm=MAX_NORM)
        foptimizer.step()
        foptimizer.zero_grad()
        torch.autograd.backward(nn.functional.mse_loss(reference(all_inputs), all_targets))
        expected_norm = nn.utils.clip_grad_norm_(reference.parameters(), max_norm=MAX_NORM)
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        assert norm is not None and not is_sharded(norm), norm
        assert torch.allclose(norm, expected_norm, atol=1e-6, rtol=1e-5), (norm, expected_norm)
        norms.append(norm)
    gathered = fabric.all_gather(torch.stack(norms))
    assert torch.equal(gathered[0], gathered[1]), "every rank must get the same global norm"
    assert_close(full_params(fmodel), {n: p.detach() for n, p in reference.named_parameters()}, atol=1e-5)

    check_accumulation(fabric, fmodel, reference)
    check_setup_module_then_optimizers(fabric)

    # save (a sharded directory by default), then load into fresh objects with other weights
    saved = full_params(fmodel)
    foptimizer.param_groups[0]["lr"] = 0.02
    fabric.save(out / "sharded", {"model": fmodel, "optimizer": foptimizer, "step": STEPS, "extra": torch.arange(3)})
    assert (out / "sharded").is_dir() and sorted(p.name for p in (out / "sharded").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    optimizer_state = foptimizer.state_dict()  # the set-up module goes with it: named, sharded state
    assert set(optimizer_state["state"]) == set(saved), sorted(optimizer_state["state"])
    saved_optimizer = full_optimizer_state(fmodel, foptimizer)  # a collective: every rank calls it
    if rank == 0:
        torch.save({"model": saved, "optimizer_state": saved_optimizer}, out / "expected.pt")

    torch.manual_seed(1)
    fresh = fabric.setup_module(Net())
    fresh_optimizer = fabric.setup_optimizers(torch.optim.Adam(fresh.parameters(), lr=0.5))
    state: dict[str, Any] = {"model": fresh, "optimizer": fresh_optimizer, "step": 0}
    remainder = fabric.load(out / "sharded", state)
    assert state["step"] == STEPS and set(remainder) == {"extra"} and torch.equal(remainder["extra"], torch.arange(3))
    assert_close(full_params(fresh), saved, atol=0)
    assert fresh_optimizer.param_groups[0]["lr"] == 0.02
    assert_same_optimizer_state(full_optimizer_state(fresh, fresh_optimizer), saved_optimizer)
    fresh_optimizer.load_state_dict(optimizer_state)  # FabricOptimizer.load_state_dict knows its module too

    # strict loading into a model with other keys names them; strict=False loads the rest
    other = fabric.setup_module(Net(extra=True))
    with pytest.raises(RuntimeError, match=r"missing keys \['extra.bias', 'extra.weight'\]"):
        fabric.load(out / "sharded", {"model": other})
    fabric.load(out / "sharded", {"model": other}, strict=False)
    assert_close({k: v for k, v in full_params(other).items() if not k.startswith("extra")}, saved, atol=0)
    fabric.barrier()
    return {"rank": rank, "norms": [n.item() for n in norms]}


def check_accumulation(fabric: Fabric, fmodel: Any, reference: nn.Module) -> None:
    """``no_backward_sync``: no reduce-scatter inside; the next backward reduces both micro-batches."""
    rank = fabric.global_rank
    first, second = dataset(8, seed=200).tensors, dataset(8, seed=201).tensors
    with fabric.no_backward_sync(fmodel):
        fabric.backward(nn.functional.mse_loss(fmodel(first[0][rank::WORLD]), first[1][rank::WORLD]))
    assert all(p.grad is None for p in fmodel.parameters()), "no gradient may be reduced inside no_backward_sync"
    fabric.backward(nn.functional.mse_loss(fmodel(second[0][rank::WORLD]), second[1][rank::WORLD]))
    for inputs, targets in (first, second):
        torch.autograd.backward(nn.functional.mse_loss(reference(inputs), targets))
    grads = {n: full(p.grad) for n, p in fmodel.named_parameters()}
    assert_close(grads, {n: full(p.grad) for n, p in reference.named_parameters()}, atol=1e-6)
    fmodel.zero_grad()
    reference.zero_grad()


def check_setup_module_then_optimizers(fabric: Fabric) -> None:
    # the optimizer built from the set-up module trains it
    fmodel = fabric.setup_module(Net())
    foptimizer = fabric.setup_optimizers(torch.optim.Adam(fmodel.parameters(), lr=LR))
    before = full_params(fmodel)
    fabric.backward(fmodel(torch.ones(2, 4)).sum())
    foptimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in full_params(fmodel).items())

    # one built before setup_module holds the replaced parameters: refused, saying what to do instead
    net = Net()
    stale = torch.optim.SGD(net.parameters(), lr=0.1)
    fmodel = fabric.setup_module(net)
    with pytest.raises(FabricUsageError, match=r"holds 8 parameter\(s\) that FSDPStrategy replaced") as error:
        fabric.setup_optimizers(stale)
    assert "after setup_module" in str(error.value) and "fabric.setup(model, optimizer)" in str(error.value)
    with pytest.raises(FabricUsageError, match="replaced when it set the module up"):
        stale.step()  # stepping it directly is caught as well


def full_optimizer_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    raw = getattr(optimizer, "optimizer", optimizer)
    inner = getattr(model, "module", model)
    return get_optimizer_state_dict(inner, raw, options=StateDictOptions(full_state_dict=True))


def assert_same_optimizer_state(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual["param_groups"] == expected["param_groups"], (actual["param_groups"], expected["param_groups"])
    assert actual["state"].keys() == expected["state"].keys()
    for name, values in expected["state"].items():
        for key, value in values.items():
            assert torch.equal(actual["state"][name][key], value), (name, key)


# ---------------------------------------------------------------------- FSDP: full single-file checkpoints
def check_fsdp_full(fabric: Fabric, folder: str) -> dict[str, Any]:
    """``state_dict_type="full"`` with CPU offload: one file on rank 0; it and the sharded directory both load."""
    out = Path(folder)
    expected = torch.load(out / "expected.pt", weights_only=True)
    fmodel = fabric.setup_module(Net())
    foptimizer = fabric.setup_optimizers(torch.optim.Adam(fmodel.parameters(), lr=0.5))
    fabric.load(out / "sharded", {"model": fmodel, "optimizer": foptimizer})  # a sharded directory loads too
    assert_close(full_params(fmodel), expected["model"], atol=0)
    assert_same_optimizer_state(full_optimizer_state(fmodel, foptimizer), expected["optimizer_state"])
    fabric.save(out / "full.pt", {"model": fmodel, "optimizer": foptimizer, "step": STEPS})
    assert (out / "full.pt").is_file()

    fresh = fabric.setup_module(Net())
    fresh_optimizer = fabric.setup_optimizers(torch.optim.Adam(fresh.parameters(), lr=0.5))
    state: dict[str, Any] = {"model": fresh, "optimizer": fresh_optimizer, "step": 0}
    assert fabric.load(out / "full.pt", state) == {}
    assert state["step"] == STEPS
    assert_close(full_params(fresh), expected["model"], atol=0)
    assert_same_optimizer_state(full_optimizer_state(fresh, fresh_optimizer), expected["optimizer_state"])
    return {"rank": fabric.global_rank}


# ---------------------------------------------------------------------- FSDP on one rank: resharding
def check_one_rank(fabric: Fabric, folder: str) -> dict[str, Any]:
    out = Path(folder)
    expected = torch.load(out / "expected.pt", weights_only=True)
    assert fabric.world_size == 1
    fmodel = fabric.setup_module(Net())
    foptimizer = fabric.setup_optimizers(torch.optim.Adam(fmodel.parameters()))
    state: dict[str, Any] = {"model": fmodel, "optimizer": foptimizer, "step": 0}
    remainder = fabric.load(out / "sharded", state)
    assert set(remainder) == {"extra"} and state["step"] == STEPS
    assert_close(full_params(fmodel), expected["model"], atol=0)
    assert_same_optimizer_state(full_optimizer_state(fmodel, foptimizer), expected["optimizer_state"])
    return {"rank": fabric.global_rank}


# ---------------------------------------------------------------------- model parallel: 2-way tensor parallel
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(torch.relu(self.fc1(x)))
        return out


def tensor_parallel(module: nn.Module, device_mesh: Any) -> nn.Module:
    """The user's ``parallelize_fn``: fc1 split by output features, fc2 by input features."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
    return parallelize_module(module, device_mesh["tensor_parallel"], plan)


def mlp_data() -> TensorDataset:
    generator = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(8 * STEPS, 8, generator=generator), torch.randn(8 * STEPS, 4, generator=generator))


def check_tensor_parallel(fabric: Fabric, folder: str) -> dict[str, Any]:
    out = Path(folder)
    assert fabric.strategy.device_mesh.shape == (1, WORLD)  # type: ignore[attr-defined]
    torch.manual_seed(42)
    model = MLP()
    reference = MLP()
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # made before parallelizing
    fmodel, foptimizer = fabric.setup(model, optimizer)
    assert fmodel.fc1.weight.to_local().shape == (8, 8) and fmodel.fc2.weight.to_local().shape == (4, 8)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)

    # one tensor-parallel group: both ranks see every sample
    loader = fabric.setup_dataloaders(DataLoader(mlp_data(), batch_size=8, shuffle=False))
    for (inputs, targets), (all_inputs, _) in zip(loader, DataLoader(mlp_data(), batch_size=8), strict=True):
        assert torch.equal(inputs, all_inputs)
        output = fmodel(inputs)
        expected = reference(inputs)
        assert torch.allclose(full(output), expected.detach(), atol=1e-5)
        fabric.backward(nn.functional.mse_loss(output, targets))
        norm = fabric.clip_gradients(fmodel, foptimizer, max_norm=MAX_NORM)
        foptimizer.step()
        foptimizer.zero_grad()
        torch.autograd.backward(nn.functional.mse_loss(expected, targets))
        expected_norm = nn.utils.clip_grad_norm_(reference.parameters(), max_norm=MAX_NORM)
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        assert norm is not None and not is_sharded(norm)
        assert torch.allclose(norm, expected_norm, atol=1e-6, rtol=1e-5), (norm, expected_norm)
    assert_close(full_params(fmodel), {n: p.detach() for n, p in reference.named_parameters()}, atol=1e-5)

    fabric.save(out / "tp", {"model": fmodel, "optimizer": foptimizer, "step": STEPS})
    if fabric.global_rank == 0:
        torch.save({"model": reference.state_dict(), "optimizer": ref_optimizer.state_dict()}, out / "tp_expected.pt")
    torch.manual_seed(0)
    fresh = MLP()
    fresh_model, fresh_optimizer = fabric.setup(fresh, torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9))
    state: dict[str, Any] = {"model": fresh_model, "optimizer": fresh_optimizer, "step": 0}
    assert fabric.load(out / "tp", state) == {} and state["step"] == STEPS
    assert_close(full_params(fresh_model), full_params(fmodel), atol=0)
    assert fresh_optimizer.param_groups[0]["lr"] == 0.1

    # setup_module, then an optimizer over the parallelized parameters; one made before is refused
    separate = fabric.setup_module(MLP())
    sgd = fabric.setup_optimizers(torch.optim.SGD(separate.parameters(), lr=0.1))
    fabric.backward(separate(torch.ones(2, 8)).sum())
    sgd.step()
    net = MLP()
    stale = torch.optim.SGD(net.parameters(), lr=0.1)
    fabric.setup_module(net)
    with pytest.raises(FabricUsageError, match="that ModelParallelStrategy replaced"):
        fabric.setup_optimizers(stale)
    fabric.barrier()
    return {"rank": fabric.global_rank}
