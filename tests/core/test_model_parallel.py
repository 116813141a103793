"""Single-process tests of ModelParallelStrategy: arguments, mesh shapes, launchers, precisions, setup errors.

Multi-rank training and checkpoints: test_model_parallel_distributed.py.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.device_mesh
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.environments.local import LocalEnvironment
from torchloom.core.errors import ConfigurationError
from torchloom.core.launchers.multiprocessing import MultiprocessingLauncher
from torchloom.core.launchers.subprocess_script import SubprocessScriptLauncher
from torchloom.core.precision.amp import MixedPrecision
from torchloom.core.precision.double import DoublePrecision
from torchloom.core.precision.half import HalfPrecision
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies.model_parallel import ModelParallelStrategy, resolve_mesh_shape
from torchloom.core.strategies.sharded import ShardedStrategy


def make_strategy(num_processes: int = 1, **kwargs: Any) -> ModelParallelStrategy:
    return ModelParallelStrategy(
        accelerator=CPUAccelerator(),
        parallel_devices=[torch.device("cpu")] * num_processes,
        cluster_environment=LocalEnvironment(),
        timeout=datetime.timedelta(seconds=30),
        **kwargs,
    )


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.setenv(name, "")  # recorded, so that whatever a test sets is undone afterwards
        monkeypatch.delenv(name)


# ---------------------------------------------------------------------- mesh shapes
@pytest.mark.parametrize(
    ("dp", "tp", "world_size", "num_nodes", "expected"),
    [
        ("auto", "auto", 4, 1, (1, 4)),  # one node: all tensor parallel
        ("auto", "auto", 8, 2, (2, 4)),  # tensor parallel inside a node, data parallel across nodes
        ("auto", "auto", 1, 1, (1, 1)),
        (2, "auto", 4, 1, (2, 2)),
        ("auto", 4, 8, 1, (2, 4)),
        (4, "auto", 4, 1, (4, 1)),
        (1, 2, 2, 1, (1, 2)),
        (2, 2, 4, 2, (2, 2)),
    ],
)
def test_mesh_shape_resolution(dp: Any, tp: Any, world_size: int, num_nodes: int, expected: tuple[int, int]) -> None:
    assert resolve_mesh_shape(dp, tp, world_size, num_nodes) == expected


@pytest.mark.parametrize(
    ("dp", "tp", "world_size"), [(3, "auto", 4), ("auto", 3, 4), (2, 3, 4), (8, "auto", 4), (1, 1, 2)]
)
def test_mesh_sizes_that_do_not_multiply_to_the_world_size(dp: Any, tp: Any, world_size: int) -> None:
    with pytest.raises(ConfigurationError) as error:
        resolve_mesh_shape(dp, tp, world_size)
    message = str(error.value)
    assert f"data_parallel_size={dp!r}" in message and f"tensor_parallel_size={tp!r}" in message
    assert f"world size {world_size}" in message


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", "AUTO", None, True])
@pytest.mark.parametrize("argument", ["data_parallel_size", "tensor_parallel_size"])
def test_bad_mesh_sizes_are_rejected_at_construction(argument: str, bad: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"{argument}={bad!r} is not valid. Valid: an int >= 1, or 'auto'"):
        ModelParallelStrategy(**{argument: bad})


def test_other_bad_arguments_name_the_valid_choices() -> None:
    with pytest.raises(ConfigurationError, match="parallelize_fn=3 is not callable"):
        ModelParallelStrategy(parallelize_fn=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"save_distributed_checkpoint='yes' is not valid. Valid: True, False"):
        ModelParallelStrategy(save_distributed_checkpoint="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"start_method='thread' is not valid. Valid: 'popen', 'spawn'"):
        ModelParallelStrategy(start_method="thread")
    with pytest.raises(ConfigurationError, match="timeout"):
        ModelParallelStrategy(timeout=datetime.timedelta(seconds=0))


def test_wrong_mesh_size_fails_before_any_process_group(clean_env: None) -> None:
    strategy = make_strategy(2, data_parallel_size=3)
    with pytest.raises(ConfigurationError, match=r"data_parallel_size=3.*world size 2"):
        strategy.setup_environment()
    assert not dist.is_initialized()


# ---------------------------------------------------------------------- wiring
def test_is_a_sharded_strategy_with_the_launcher_its_start_method_asks_for(clean_env: None) -> None:
    strategy = make_strategy(2)
    assert isinstance(strategy, ShardedStrategy) and strategy.restore_checkpoint_after_setup
    assert strategy.start_method == "popen" and strategy.parallelize_fn is None
    strategy.configure_launcher()
    assert isinstance(strategy.launcher, SubprocessScriptLauncher)
    for method in ("spawn", "fork", "notebook"):
        strategy = make_strategy(2, start_method=method)
        strategy.configure_launcher()
        assert isinstance(strategy.launcher, MultiprocessingLauncher) and strategy.launcher.start_method == method
    assert "tensor_parallel_size='auto'" in repr(strategy) and "start_method='notebook'" in repr(strategy)


def test_device_mesh_is_an_error_before_setup() -> None:
    with pytest.raises(ConfigurationError):
        make_strategy().device_mesh  # noqa: B018


def test_cuda_mesh_uses_the_rank_device_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path on a CPU machine: the mesh is built for "cuda" with the resolved shape and names."""
    captured: dict[str, Any] = {}

    def fake_init_device_mesh(device_type: str, shape: tuple[int, ...], *, mesh_dim_names: tuple[str, ...]) -> str:
        captured.update(device_type=device_type, shape=shape, names=mesh_dim_names)
        return "mesh"

    monkeypatch.setattr(torch.distributed.device_mesh, "init_device_mesh", fake_init_device_mesh)
    strategy = make_strategy(data_parallel_size=2)
    strategy.parallel_devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    strategy.num_nodes = 2
    strategy.local_rank = 1
    strategy.cluster_environment.set_world_size(4)
    assert strategy.root_device == torch.device("cuda", 1)
    assert strategy._build_device_mesh() == "mesh"
    assert captured == {"device_type": "cuda", "shape": (2, 2), "names": ("data_parallel", "tensor_parallel")}


def test_supported_precisions_pass_and_others_are_refused_with_the_list() -> None:
    strategy = make_strategy()
    for precision in (
        Precision(),
        DoublePrecision(),
        MixedPrecision("bf16-mixed"),
        HalfPrecision("bf16-true"),
        HalfPrecision("16-true"),
    ):
        assert strategy.adapt_precision(precision) is precision
    with pytest.raises(ConfigurationError) as error:
        strategy.adapt_precision(MixedPrecision("16-mixed"))
    assert "precision='16-mixed'" in str(error.value)
    assert "'32-true', '64-true', 'bf16-mixed', 'bf16-true', '16-true'" in str(error.value)


# ---------------------------------------------------------------------- a real one-rank job
def tensor_parallel(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    return parallelize_module(module, mesh["tensor_parallel"], {"0": ColwiseParallel()})


def test_one_rank_job_mesh_sampler_and_setup_errors(clean_env: None) -> None:
    strategy = make_strategy(parallelize_fn=tensor_parallel)
    strategy.setup_environment()
    try:
        mesh = strategy.device_mesh
        assert mesh.mesh_dim_names == ("data_parallel", "tensor_parallel") and tuple(mesh.shape) == (1, 1)
        assert strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}

        module = strategy.setup_module(nn.Sequential(nn.Linear(3, 4)))
        assert isinstance(module.get_parameter("0.weight"), DTensor)

        # without parallelize_fn the module must come parallelized (configure_model does it)
        bare = make_strategy()
        bare.setup_environment()
        with pytest.raises(ConfigurationError, match=r"parallelize_fn missing: Linear has no DTensor parameters"):
            bare.setup_module(nn.Linear(3, 4))
        already = tensor_parallel(nn.Sequential(nn.Linear(3, 4)), bare.device_mesh)
        assert bare.setup_module(already) is already

        def returns_nothing(module: nn.Module, mesh: DeviceMesh) -> None:
            parallelize_module(module, mesh["tensor_parallel"], {"0": ColwiseParallel()})

        broken = make_strategy(parallelize_fn=returns_nothing)
        broken.setup_environment()
        with pytest.raises(ConfigurationError, match=r"returns_nothing returned NoneType, not an nn.Module"):
            broken.setup_module(nn.Sequential(nn.Linear(3, 4)))
    finally:
        strategy.teardown()
    assert not dist.is_initialized()
