"""Real multi-process ModelParallelStrategy jobs over gloo, checked against a single-process oracle.

Each test runs this file as a script under a deadline (``python THIS_FILE SCENARIO... OUT_DIR``); the script
starts the workers with the strategy's own fork launcher, so torch is imported once per job. Every rank
asserts its checks itself; a failed assertion fails its worker, the launch and the script.

Scenarios (in the order the first test runs them, each using the checkpoints of the one before):

- ``tp``: 1 x 2 mesh, ColwiseParallel fc1 / RowwiseParallel fc2, matches the unsharded MLP; saves a sharded
  directory and a full file;
- ``dp``: 2 x 1 mesh, ``fully_shard`` on a meta-initialized model, matches single-process training; loads the
  tensor-parallel checkpoint (another mesh) and the full file;
- ``single``: one process loads the sharded checkpoint into a module it parallelized itself;
- ``mesh2x2``: 2 x 2 mesh, FSDP x TP on 4 processes.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from tests.processes import explain, job_env, run_python
from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.environments.local import LocalEnvironment
from torchloom.core.precision.amp import MixedPrecision
from torchloom.core.strategies.model_parallel import ModelParallelStrategy

REPOSITORY = Path(__file__).resolve().parents[2]
STEPS = 3
GLOBAL_BATCH = 8
LR = 0.1
ATOL = 1e-5


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(torch.relu(self.fc1(x)))
        return out


def make_model() -> MLP:
    torch.manual_seed(42)
    return MLP()


def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=LR, momentum=0.9)  # momentum: state that checkpoints must carry


def data(steps: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [
        (torch.randn(GLOBAL_BATCH, 8, generator=generator), torch.randn(GLOBAL_BATCH, 4, generator=generator))
        for _ in range(steps)
    ]


def reference(steps: int) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Single-process training on the whole batch: the outputs of each step and the final weights."""
    model = make_model()
    optimizer = make_optimizer(model)
    outputs = []
    for x, y in data(steps):
        out = model(x)
        outputs.append(out.detach())
        torch.autograd.backward(nn.functional.mse_loss(out, y))
        optimizer.step()
        optimizer.zero_grad()
    return outputs, {name: p.detach().clone() for name, p in model.named_parameters()}


def dtensor(module: nn.Module, name: str) -> DTensor:
    parameter = module.get_parameter(name)
    assert isinstance(parameter, DTensor), f"{name} is a {type(parameter).__name__}, not a DTensor"
    return parameter


def full_weights(module: nn.Module) -> dict[str, Tensor]:
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in module.named_parameters()
    }


def assert_close(actual: dict[str, Tensor], expected: dict[str, Tensor], exact: bool = False) -> None:
    assert sorted(actual) == sorted(expected), (sorted(actual), sorted(expected))
    for name, value in expected.items():
        if exact:
            assert torch.equal(actual[name], value), f"{name} differs: {(actual[name] - value).abs().max()}"
        else:
            assert torch.allclose(actual[name], value, atol=ATOL, rtol=0), (
                f"{name}: {(actual[name] - value).abs().max()}"
            )


def local_rows(strategy: ModelParallelStrategy) -> slice:
    """This rank's slice of a global batch: by data-parallel rank, so a tensor-parallel group shares one."""
    sampler = strategy.distributed_sampler_kwargs
    size = GLOBAL_BATCH // sampler["num_replicas"]
    return slice(sampler["rank"] * size, (sampler["rank"] + 1) * size)


def train(
    strategy: ModelParallelStrategy, model: nn.Module, optimizer: torch.optim.Optimizer, steps: list[Any]
) -> list[Tensor]:
    """Trains on this rank's data-parallel slice of each batch; returns the slice's outputs."""
    rows = local_rows(strategy)
    outputs = []
    for x, y in steps:
        x, y = x[rows], y[rows]
        out = model(x)
        outputs.append(out.detach().clone())
        strategy.backward(nn.functional.mse_loss(out, y), model)
        strategy.optimizer_step(optimizer)
        optimizer.zero_grad()
    return outputs


def assert_global_grad_norm(
    strategy: ModelParallelStrategy, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """After training: one more backward; the clipping norm is the unsharded model's, on every rank."""
    oracle = make_model()
    oracle.load_state_dict(reference(STEPS)[1])
    x, y = data(STEPS + 1)[STEPS]
    torch.autograd.backward(nn.functional.mse_loss(oracle(x), y))
    expected = torch.nn.utils.get_total_norm([p.grad for p in oracle.parameters() if p.grad is not None])
    rows = local_rows(strategy)
    strategy.backward(nn.functional.mse_loss(model(x[rows]), y[rows]), model)
    norm = strategy.clip_gradients_norm(model, optimizer, max_norm=1e6)
    assert not isinstance(norm, DTensor) and torch.allclose(norm, expected, atol=ATOL, rtol=1e-5), (norm, expected)
    optimizer.zero_grad()


# ---------------------------------------------------------------------- parallelize_fn recipes
def tensor_parallel(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    return parallelize_module(module, mesh["tensor_parallel"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})


def fully_sharded(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    for name in ("fc1", "fc2"):
        fully_shard(module.get_submodule(name), mesh=mesh["data_parallel"])
    fully_shard(module, mesh=mesh["data_parallel"])
    return module


def tensor_parallel_then_fully_sharded(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    return fully_sharded(tensor_parallel(module, mesh), mesh)


def make_strategy(num_processes: int, **kwargs: Any) -> ModelParallelStrategy:
    strategy = ModelParallelStrategy(
        start_method="fork",
        timeout=datetime.timedelta(seconds=60),
        accelerator=CPUAccelerator(),
        parallel_devices=[torch.device("cpu")] * num_processes,
        cluster_environment=LocalEnvironment(),
        **kwargs,
    )
    strategy.configure_launcher()
    return strategy


# ---------------------------------------------------------------------- what each rank runs
def run_tensor_parallel(strategy: ModelParallelStrategy, out_dir: str) -> None:
    rank = strategy.global_rank
    assert strategy.device_mesh.mesh_dim_names == ("data_parallel", "tensor_parallel")
    assert tuple(strategy.device_mesh.shape) == (1, 2)
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}  # one TP group: same batch

    model: nn.Module = make_model()
    optimizer = make_optimizer(model)  # built over the unsharded module: setup re-binds it to the DTensors
    model, [optimizer], _ = strategy.setup_module_and_optimizers(model, [optimizer])
    assert dtensor(model, "fc1.weight").placements == (Shard(0),)
    assert dtensor(model, "fc2.weight").placements == (Shard(1),)
    assert dtensor(model, "fc1.weight").to_local().shape == (8, 8)
    assert dtensor(model, "fc2.weight").to_local().shape == (4, 8)
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in model.parameters()}

    expected_outputs, expected_weights = reference(STEPS)
    outputs = train(strategy, model, optimizer, data(STEPS))
    for step, (out, expected) in enumerate(zip(outputs, expected_outputs)):
        assert torch.allclose(out, expected, atol=ATOL, rtol=0), (
            f"rank {rank} step {step}: {(out - expected).abs().max()}"
        )
    weights = full_weights(model)
    assert_close(weights, expected_weights)
    assert_global_grad_norm(strategy, model, optimizer)

    # bf16 autocast runs through the tensor-parallel layers too
    x = data(1)[0][0]
    with MixedPrecision("bf16-mixed").forward_context():
        low = model(x)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), model(x), atol=0.05, rtol=0.05)

    state = {"model": model, "optimizer": optimizer, "step": STEPS}
    strategy.save_checkpoint(Path(out_dir, "sharded"), state)
    assert Path(out_dir, "sharded").is_dir()
    full = make_strategy(2, save_distributed_checkpoint=False)  # same group, full-file checkpoints
    full.local_rank = strategy.local_rank
    full.setup_environment()
    full.save_checkpoint(Path(out_dir, "full.pt"), state)
    if rank == 0:
        saved = torch.load(Path(out_dir, "full.pt"), weights_only=True)
        assert saved["step"] == STEPS
        assert_close(saved["model"], weights, exact=True)
        torch.save(weights, Path(out_dir, "weights.pt"))
    strategy.barrier()


def run_data_parallel(strategy: ModelParallelStrategy, out_dir: str) -> None:
    rank = strategy.global_rank
    assert tuple(strategy.device_mesh.shape) == (2, 1)
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": rank}

    # built on the meta device, so no rank holds the whole model; setup materializes each shard
    with strategy.module_init_context(empty_init=True):
        model: nn.Module = make_model()
    assert all(p.is_meta for p in model.parameters())
    model = strategy.setup_module(model)
    assert not any(dtensor(model, name).to_local().is_meta for name, _ in model.named_parameters())
    assert dtensor(model, "fc1.weight").to_local().shape == (8, 8)
    assert dtensor(model, "fc1.weight").placements == (Shard(0),)
    strategy.load_module_state_dict(model, make_model().state_dict())  # full tensors in, each rank keeps its shard
    optimizer = make_optimizer(model)

    expected_outputs, expected_weights = reference(STEPS)
    outputs = train(strategy, model, optimizer, data(STEPS))
    rows = local_rows(strategy)
    for step, (out, expected) in enumerate(zip(outputs, expected_outputs)):
        assert torch.allclose(out, expected[rows], atol=ATOL, rtol=0), f"rank {rank} step {step}"
    assert_close(full_weights(model), expected_weights)
    assert_global_grad_norm(strategy, model, optimizer)

    # the tensor-parallel run's checkpoint, on another mesh: identical tensors, momentum carried over
    saved_weights = torch.load(Path(out_dir, "weights.pt"), weights_only=True)
    _, expected_after_four = reference(STEPS + 1)
    for name in ("sharded", "full.pt"):
        with strategy.module_init_context(empty_init=True):
            fresh: nn.Module = make_model()
        fresh = strategy.setup_module(fresh)
        fresh_optimizer = make_optimizer(fresh)
        state: dict[str, Any] = {"model": fresh, "optimizer": fresh_optimizer, "step": 0}
        rest = strategy.load_checkpoint(Path(out_dir, name), state)
        assert state["step"] == STEPS and rest == {}, (name, state["step"], rest)
        assert_close(full_weights(fresh), saved_weights, exact=True)
        train(strategy, fresh, fresh_optimizer, data(STEPS + 1)[STEPS:])
        assert_close(full_weights(fresh), expected_after_four)


def run_single(strategy: ModelParallelStrategy, out_dir: str) -> None:
    assert tuple(strategy.device_mesh.shape) == (1, 1)
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}
    # no parallelize_fn: the module arrives parallelized, as configure_model leaves it
    model = tensor_parallel(make_model(), strategy.device_mesh)
    model = strategy.setup_module(model)
    optimizer = make_optimizer(model)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
    strategy.load_checkpoint(Path(out_dir, "sharded"), state)
    assert state["step"] == STEPS
    assert_close(full_weights(model), torch.load(Path(out_dir, "weights.pt"), weights_only=True), exact=True)
    train(strategy, model, optimizer, data(STEPS + 1)[STEPS:])
    assert_close(full_weights(model), reference(STEPS + 1)[1])


def run_mesh_2x2(strategy: ModelParallelStrategy, out_dir: str) -> None:
    rank = strategy.global_rank
    assert tuple(strategy.device_mesh.shape) == (2, 2)
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": rank // 2}
    model = strategy.setup_module(make_model())
    weight = dtensor(model, "fc1.weight")
    assert weight.device_mesh.ndim == 2 and weight.to_local().numel() == 16 * 8 // 4
    optimizer = make_optimizer(model)
    expected_outputs, expected_weights = reference(STEPS)
    outputs = train(strategy, model, optimizer, data(STEPS))
    rows = local_rows(strategy)
    for step, (out, expected) in enumerate(zip(outputs, expected_outputs)):
        assert torch.allclose(out, expected[rows], atol=ATOL, rtol=0), f"rank {rank} step {step}"
    assert_close(full_weights(model), expected_weights)
    assert_global_grad_norm(strategy, model, optimizer)


SCENARIOS: dict[str, tuple[Callable[[ModelParallelStrategy, str], None], dict[str, Any]]] = {
    "tp": (run_tensor_parallel, {"num_processes": 2, "parallelize_fn": tensor_parallel}),
    "dp": (run_data_parallel, {"num_processes": 2, "parallelize_fn": fully_sharded, "data_parallel_size": 2}),
    "single": (run_single, {"num_processes": 1}),
    "mesh2x2": (
        run_mesh_2x2,
        {"num_processes": 4, "parallelize_fn": tensor_parallel_then_fully_sharded, "tensor_parallel_size": 2},
    ),
}


def main(names: list[str], out_dir: str) -> None:
    for name in names:
        function, kwargs = SCENARIOS[name]
        strategy = make_strategy(**kwargs)
        assert strategy.launcher is not None
        start = time.monotonic()
        strategy.launcher.launch(function, strategy, out_dir)
        print(f"SCENARIO {name} PASSED in {time.monotonic() - start:.1f} s", flush=True)


# ---------------------------------------------------------------------- the tests
def run_scenarios(tmp_path: Path, *names: str, timeout: float) -> str:
    env = job_env(PYTHONPATH=os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")]))
    process = run_python(__file__, *names, str(tmp_path), timeout=timeout, env=env)
    assert process.returncode == 0, explain(process)
    for name in names:
        assert f"SCENARIO {name} PASSED" in process.stdout, explain(process)
    return process.stdout


def test_tensor_parallel_and_fully_sharded_runs_match_one_process_and_share_checkpoints(tmp_path: Path) -> None:
    run_scenarios(tmp_path, "tp", "dp", "single", timeout=120)


def test_fsdp_x_tensor_parallel_on_a_2x2_mesh(tmp_path: Path) -> None:
    run_scenarios(tmp_path, "mesh2x2", timeout=90)


if __name__ == "__main__":
    main(sys.argv[1:-1], sys.argv[-1])
