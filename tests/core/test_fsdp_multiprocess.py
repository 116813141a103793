"""FSDPStrategy on two real gloo ranks: sharding, training parity, clipping, checkpoints that reshard.

One job runs every check (a launch costs seconds): pytest runs this file as a script, which starts two
workers through the strategy's own fork launcher; each rank asserts everything itself, so a failed
check fails its worker and the job. The script then checks, in one process, what the workers saved:
a load on a single rank, ``consolidate``, and the full single-file save.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

if __name__ == "__main__":  # run as a script: the repository root, for `tests`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.processes import explain, run_python
from tests.sharded_models import Block, Net, clean, full, full_params
from torchloom.core.checkpoint.consolidate import consolidate
from torchloom.core.checkpoint.distributed import META_FILE, is_sharded_checkpoint
from torchloom.core.connector import Connector
from torchloom.core.precision.fsdp import FSDPPrecision
from torchloom.core.strategies.fsdp import FSDPStrategy

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 3


def batch(step: int) -> tuple[Tensor, Tensor]:
    """The global batch of a step; rank r trains on rows r::WORLD."""
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 4, generator=generator), torch.randn(8, 3, generator=generator)


def local(tensor: Any) -> Tensor:
    """This rank's shard of a DTensor."""
    shard: Tensor = tensor.to_local()
    return shard


def wired(strategy: FSDPStrategy, like: FSDPStrategy, precision: str = "32-true") -> FSDPStrategy:
    """Another strategy in the same workers, sharing the process group of ``like``."""
    strategy.accelerator = like.accelerator
    strategy.precision = strategy.adapt_precision(FSDPPrecision(precision))
    strategy.parallel_devices = like.parallel_devices
    strategy.cluster_environment = like.cluster_environment
    strategy.local_rank = like.local_rank
    strategy.setup_environment()
    return strategy


def assert_close(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for name in expected:
        assert torch.allclose(actual[name], expected[name], atol=atol, rtol=0), name


# ---------------------------------------------------------------------- the workers
def check_sharding_and_training(strategy: FSDPStrategy) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    rank = strategy.global_rank
    torch.manual_seed(0)
    reference = Net()
    with strategy.module_init_context(empty_init=True):
        unsharded = Net()
    assert all(p.is_meta for p in unsharded.parameters()), "empty_init must build on the meta device"
    adam = torch.optim.Adam(unsharded.parameters(), lr=0.01)  # built over the unsharded (meta) parameters
    model, [optimizer], _ = strategy.setup_module_and_optimizers(unsharded, [adam])
    assert model is unsharded and optimizer is adam
    assert not any(p.is_meta for p in model.parameters())
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in model.parameters()]

    # each rank holds its dim-0 chunk of every parameter: about half of the model's bytes
    local_bytes = total_bytes = 0
    for name, param in model.named_parameters():
        shard = local(param)
        chunk = -(-param.shape[0] // WORLD)
        expected_rows = min(chunk, max(param.shape[0] - rank * chunk, 0))
        assert shard.shape[0] == expected_rows, (name, shard.shape, param.shape)
        local_bytes += shard.untyped_storage().nbytes()
        total_bytes += param.numel() * param.element_size()
    assert 0.4 < local_bytes / total_bytes < 0.6, (local_bytes, total_bytes)

    # each rank initialised only its shards, and together they are the model a normal init after the seed gives
    assert_close(full_params(model), dict(reference.named_parameters()), atol=0)
    probe = batch(0)[0]
    assert torch.equal(model(probe), reference(probe))

    reference = Net()  # other weights, loaded as a full state dict into the shards
    strategy.load_module_state_dict(model, reference.state_dict())
    assert_close(full_params(model), dict(reference.named_parameters()), atol=0)
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=0.01)
    blocks = [m for m in model.modules() if isinstance(m, Block)]  # inside activation checkpointing's wrappers
    for block in blocks:
        block.calls = 0
    for step in range(STEPS):
        inputs, targets = batch(step)
        loss = nn.functional.mse_loss(model(inputs[rank::WORLD]), targets[rank::WORLD])
        strategy.backward(loss, model)
        torch.autograd.backward(nn.functional.mse_loss(reference(inputs), targets))
        if step == 1:  # clipping by norm: the global norm, the same on every rank, and the same clipped grads
            norm = strategy.clip_gradients_norm(model, optimizer, max_norm=0.05)
            expected = nn.utils.clip_grad_norm_(reference.parameters(), max_norm=0.05)
            assert not hasattr(norm, "placements") and torch.allclose(norm, expected, atol=1e-6), (norm, expected)
            norms = strategy.all_gather(norm.reshape(1))
            assert torch.equal(norms[0], norms[1])
            grads = {clean(n): full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
            assert_close(grads, {n: full(p.grad) for n, p in reference.named_parameters() if p.grad is not None})
        strategy.optimizer_step(optimizer)
        optimizer.zero_grad()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
    assert_close(full_params(model), {n: p.detach() for n, p in reference.named_parameters()}, atol=1e-5)
    # activation checkpointing recomputes each block's forward in backward
    assert [block.calls for block in blocks] == [2 * STEPS, 2 * STEPS]
    assert [block.calls for block in reference.modules() if isinstance(block, Block)] == [STEPS, STEPS]

    # an infinity norm is global too
    inputs, targets = batch(10)
    strategy.backward(nn.functional.mse_loss(model(inputs[rank::WORLD]), targets[rank::WORLD]), model)
    torch.autograd.backward(nn.functional.mse_loss(reference(inputs), targets))
    norm = strategy.clip_gradients_norm(model, optimizer, max_norm=1e3, norm_type=float("inf"))
    ref_grads = [p.grad for p in reference.parameters() if p.grad is not None]
    assert torch.allclose(norm, nn.utils.get_total_norm(ref_grads, float("inf")))
    optimizer.zero_grad()
    reference.zero_grad()

    # no_backward_sync: the first micro-batch's gradients stay local and unreduced, the synced one reduces all
    first, second = batch(20), batch(21)
    with strategy.no_backward_sync(model):
        strategy.backward(nn.functional.mse_loss(model(first[0][rank::WORLD]), first[1][rank::WORLD]), model)
    assert all(p.grad is None for p in model.parameters()), "no reduce-scatter may happen inside no_backward_sync"
    strategy.backward(nn.functional.mse_loss(model(second[0][rank::WORLD]), second[1][rank::WORLD]), model)
    for inputs, targets in (first, second):
        torch.autograd.backward(nn.functional.mse_loss(reference(inputs), targets))
    grads = {clean(n): full(p.grad) for n, p in model.named_parameters()}
    assert_close(grads, {n: full(p.grad) for n, p in reference.named_parameters()}, atol=1e-6)
    optimizer.zero_grad()
    return model, optimizer, reference


def check_checkpoints(strategy: FSDPStrategy, model: nn.Module, optimizer: Any, folder: Path) -> None:
    path = folder / "sharded"
    saved = full_params(model)
    saved_optimizer = strategy_full_optimizer_state(strategy, model, optimizer)
    strategy.save_checkpoint(path, {"model": model, "optimizer": optimizer, "step": 3, "extra": {"t": torch.arange(3)}})
    assert is_sharded_checkpoint(path) and (path / META_FILE).is_file()
    assert sorted(p.name for p in path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    # load on the same two ranks into fresh objects (other initial weights)
    torch.manual_seed(1)
    fresh_net = Net()
    fresh_adam = torch.optim.Adam(fresh_net.parameters(), lr=0.5)
    fresh, [fresh_optimizer], _ = strategy.setup_module_and_optimizers(fresh_net, [fresh_adam])
    state: dict[str, Any] = {"model": fresh, "optimizer": fresh_optimizer, "step": 0}
    remainder = strategy.load_checkpoint(path, state)
    assert state["step"] == 3 and set(remainder) == {"extra"} and torch.equal(remainder["extra"]["t"], torch.arange(3))
    assert_close(full_params(fresh), saved, atol=0)
    assert fresh_optimizer.param_groups[0]["lr"] == 0.01
    assert_optimizer_states_equal(strategy_full_optimizer_state(strategy, fresh, fresh_optimizer), saved_optimizer)

    # a failed save leaves the previous checkpoint intact (rank 0 cannot pickle the lambda)
    before = sorted(p.name for p in path.iterdir())
    # every rank raises: rank 0 its own error, the others that rank 0 failed
    expected_error = "lambda|pickle" if strategy.global_rank == 0 else "failed on rank 0"
    with pytest.raises(Exception, match=expected_error):
        strategy.save_checkpoint(path, {"model": model, "broken": lambda: None})
    strategy.barrier()
    assert sorted(p.name for p in path.iterdir()) == before
    assert not list(folder.glob(".sharded.*")), "no staging directory may be left behind"

    # strict loading into a model with other keys names them
    other: Any = strategy.setup_module(Net(extra=True))
    with pytest.raises(RuntimeError, match=r"missing keys \['extra.bias', 'extra.weight'\]"):
        strategy.load_checkpoint(path, {"model": other})
    strategy.load_checkpoint(path, {"model": other}, strict=False)
    assert_close({k: v for k, v in full_params(other).items() if not k.startswith("extra")}, saved, atol=0)

    # another mesh: a (2 x 1) replicated layout loads the same tensors
    replicated = wired(FSDPStrategy(sharding_strategy="NO_SHARD"), strategy)
    assert replicated.device_mesh.shape == (2, 1)
    copy_model: Any = replicated.setup_module(Net())
    assert local(copy_model.inp.weight).shape == (16, 4)
    replicated.load_checkpoint(path, {"model": copy_model})
    assert_close(full_params(copy_model), saved, atol=0)
    inputs, targets = batch(30)  # clipping over replicas: the norm of the averaged gradients
    rows = slice(strategy.global_rank, None, WORLD)
    replicated.backward(nn.functional.mse_loss(copy_model(inputs[rows]), targets[rows]), copy_model)
    sgd = torch.optim.SGD(copy_model.parameters(), lr=0.1)
    expected = nn.utils.get_total_norm([full(p.grad) for p in copy_model.parameters()])
    assert torch.allclose(replicated.clip_gradients_norm(copy_model, sgd, max_norm=1e-3), expected, atol=1e-6)

    # a full single-file save, gathered on rank 0, and loaded back into a sharded model
    full_strategy = wired(FSDPStrategy(state_dict_type="full"), strategy)
    full_strategy.save_checkpoint(folder / "full.pt", {"model": model, "optimizer": optimizer, "step": 3})
    fresh2 = strategy.setup_module(Net())
    fresh2_optimizer = torch.optim.Adam(fresh2.parameters(), lr=0.5)
    strategy.load_checkpoint(folder / "full.pt", {"model": fresh2, "optimizer": fresh2_optimizer})
    assert_close(full_params(fresh2), saved, atol=0)
    assert_optimizer_states_equal(strategy_full_optimizer_state(strategy, fresh2, fresh2_optimizer), saved_optimizer)


def strategy_full_optimizer_state(strategy: FSDPStrategy, model: nn.Module, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def assert_optimizer_states_equal(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual["param_groups"] == expected["param_groups"], (actual["param_groups"], expected["param_groups"])
    assert actual["state"].keys() == expected["state"].keys()
    for name, values in expected["state"].items():
        for key, value in values.items():
            assert torch.equal(actual["state"][name][key], value), (name, key)


def check_precisions_and_layouts(strategy: FSDPStrategy) -> None:
    rank = strategy.global_rank
    # bf16-mixed: bf16 parameters inside forward, float32 shards and gradients
    mixed = wired(FSDPStrategy(), strategy, "bf16-mixed")
    seen: list[torch.dtype] = []
    model: Any = mixed.setup_module(Net())
    model.out.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    inputs, targets = batch(0)
    with mixed.precision.forward_context():
        out = model(inputs[rank::WORLD])
    mixed.backward(nn.functional.mse_loss(mixed.precision.convert_output(out), targets[rank::WORLD]), model)
    assert seen == [torch.bfloat16] and model.out.weight.dtype == torch.float32, (seen, model.out.weight.dtype)
    assert model.out.weight.grad is not None and model.out.weight.grad.dtype == torch.float32

    # 16-mixed: an inf in one rank's shard makes every rank skip the step
    half = wired(FSDPStrategy(), strategy, "16-mixed")
    model = half.setup_module(Net())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    half.backward(nn.functional.mse_loss(model(inputs[rank::WORLD]).float(), targets[rank::WORLD]), model)
    if rank == 1:
        local(model.inp.weight.grad)[0, 0] = float("inf")
    before = local(model.out.weight).clone()
    half.optimizer_step(optimizer)
    assert torch.equal(before, local(model.out.weight)), "both ranks must skip the step"

    # HYBRID_SHARD on one node of two ranks: a (1 x 2) mesh; CPU offload keeps the shards on the CPU
    hybrid = wired(FSDPStrategy(sharding_strategy="HYBRID_SHARD", cpu_offload=True), strategy)
    assert hybrid.device_mesh.shape == (1, 2) and hybrid.device_mesh.mesh_dim_names == ("replicate", "shard")
    model = hybrid.setup_module(Net())
    assert local(model.inp.weight).shape == (8, 4)
    hybrid.backward(model(inputs[rank::WORLD]).sum(), model)
    swapped = wired(FSDPStrategy(sharding_strategy="HYBRID_SHARD", device_mesh=(2, 1)), strategy)
    assert swapped.device_mesh.shape == (2, 1)


def worker(folder: str) -> dict[str, Any]:
    strategy = FSDP_STRATEGY
    assert dist.get_world_size() == WORLD
    assert strategy.distributed_sampler_kwargs == {"num_replicas": WORLD, "rank": strategy.global_rank}
    model, optimizer, _ = check_sharding_and_training(strategy)
    check_checkpoints(strategy, model, optimizer, Path(folder))
    check_precisions_and_layouts(strategy)
    print(f"CHECKS PASSED rank={strategy.global_rank}", flush=True)
    return full_params(model)


def main(folder: Path) -> None:
    setup = Connector(accelerator="cpu", strategy=FSDP_STRATEGY, devices=WORLD).resolve()
    assert isinstance(setup.precision, FSDPPrecision) and setup.launcher is not None
    saved = setup.launcher.launch(worker, str(folder))

    # consolidation, in this process (no process group): one file with full tensors, loadable with weights_only
    consolidated = consolidate(folder / "sharded", folder / "consolidated.pt")
    loaded = torch.load(consolidated, weights_only=True)
    assert set(loaded) == {"model", "optimizer", "step", "extra"} and loaded["step"] == 3
    assert_close(loaded["model"], saved, atol=0)
    assert sorted(loaded["optimizer"]["state"]) == list(range(len(saved)))  # optimizer.state_dict()'s form
    plain = Net()
    plain.load_state_dict(loaded["model"])
    plain_optimizer = torch.optim.Adam(plain.parameters())
    plain_optimizer.load_state_dict(loaded["optimizer"])  # loads into an unsharded optimizer
    full_file = torch.load(folder / "full.pt", weights_only=True)
    assert_close(full_file["model"], saved, atol=0)
    assert full_file["optimizer"]["param_groups"] == loaded["optimizer"]["param_groups"]
    for index, values in loaded["optimizer"]["state"].items():
        for key, value in values.items():
            assert torch.equal(full_file["optimizer"]["state"][index][key], value)

    # the checkpoint of two ranks loads on one
    single = copy.deepcopy(FSDP_STRATEGY_TEMPLATE)
    Connector(accelerator="cpu", strategy=single, devices=1).resolve()
    single.setup_environment()
    try:
        model = single.setup_module(Net())
        optimizer = torch.optim.Adam(model.parameters())
        state: dict[str, Any] = {"model": model, "optimizer": optimizer}
        single.load_checkpoint(folder / "sharded", state)
        assert_close(full_params(model), saved, atol=0)
        assert optimizer.state_dict()["param_groups"][0]["lr"] == 0.01
    finally:
        single.teardown()
    print("MAIN CHECKS PASSED", flush=True)


FSDP_STRATEGY_TEMPLATE = FSDPStrategy(start_method="fork")
FSDP_STRATEGY = FSDPStrategy(start_method="fork", auto_wrap_policy={Block}, activation_checkpointing_policy={Block})


def test_fsdp_on_two_ranks(tmp_path: Path) -> None:
    process = run_python(__file__, str(tmp_path), timeout=240)
    assert process.returncode == 0, explain(process)
    for rank in range(WORLD):
        assert f"CHECKS PASSED rank={rank}" in process.stdout, explain(process)
    assert "MAIN CHECKS PASSED" in process.stdout, explain(process)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
