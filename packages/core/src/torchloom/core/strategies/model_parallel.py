"""ModelParallelStrategy: the user's own DTensor recipe (tensor parallel, FSDP2, or both) over a 2-D device mesh.

The strategy builds a ``DeviceMesh`` of shape ``(data_parallel_size, tensor_parallel_size)`` with the dim
names ``("data_parallel", "tensor_parallel")`` and hands it to the user, who decides how each layer is split:
through ``parallelize_fn(module, device_mesh)`` (Fabric), or in the module's ``configure_model`` with
``strategy.device_mesh`` (Trainer). A typical recipe applies ``parallelize_module`` on
``device_mesh["tensor_parallel"]`` and then ``fully_shard(..., mesh=device_mesh["data_parallel"])``.

Ranks of one tensor-parallel group hold different slices of the same layers, so they must see the same
batch: the data is split over the data-parallel dimension only.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from typing_extensions import override

from torchloom.core.accelerators.accelerator import Accelerator
from torchloom.core.checkpoint.io import CheckpointIO
from torchloom.core.environments.environment import ClusterEnvironment
from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies.parallel import DEFAULT_TIMEOUT
from torchloom.core.strategies.sharded import ShardedStrategy
from torchloom.core.watchdog import DEFAULT_STALL_TIMEOUT

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["MESH_DIM_NAMES", "SUPPORTED_PRECISIONS", "ModelParallelStrategy", "resolve_mesh_shape"]

MESH_DIM_NAMES = ("data_parallel", "tensor_parallel")
# Precisions whose hooks work on DTensor parameters. "16-mixed" is left out: its grad scaler must make
# the same skip decision on every rank, which is unverified when plain and DTensor parameters mix.
SUPPORTED_PRECISIONS = ("32-true", "64-true", "bf16-mixed", "bf16-true", "16-true")

ParallelizeFn = Callable[[nn.Module, "DeviceMesh"], nn.Module]
MeshSize = int | str


def resolve_mesh_shape(
    data_parallel_size: MeshSize, tensor_parallel_size: MeshSize, world_size: int, num_nodes: int = 1
) -> tuple[int, int]:
    """The ``(data_parallel, tensor_parallel)`` mesh shape for ``world_size`` processes.

    Both ``"auto"``: tensor parallel inside a node (fast links), data parallel across nodes. One given:
    the other is ``world_size`` divided by it. The product must be ``world_size``.
    """
    sizes = {"data_parallel_size": data_parallel_size, "tensor_parallel_size": tensor_parallel_size}
    for name, size in sizes.items():
        _check_size(name, size)
    if data_parallel_size == "auto" and tensor_parallel_size == "auto":
        data_parallel_size = num_nodes
        tensor_parallel_size = world_size // num_nodes
    elif data_parallel_size == "auto":
        data_parallel_size = world_size // int(tensor_parallel_size)
    elif tensor_parallel_size == "auto":
        tensor_parallel_size = world_size // int(data_parallel_size)
    dp, tp = int(data_parallel_size), int(tensor_parallel_size)
    if dp < 1 or tp < 1 or dp * tp != world_size:
        given = ", ".join(f"{name}={value!r}" for name, value in sizes.items())
        raise ConfigurationError(
            f"ModelParallelStrategy({given}) gives a {dp} x {tp} device mesh, which does not match the world size "
            f"{world_size} ({num_nodes} node(s)): data_parallel_size * tensor_parallel_size must equal the number "
            f"of processes. Pass sizes whose product is {world_size}, or 'auto' for one of them."
        )
    return dp, tp


def _check_size(name: str, size: object) -> None:
    if size == "auto" and isinstance(size, str):
        return
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigurationError(f"{name}={size!r} is not valid. Valid: an int >= 1, or 'auto'.")


class ModelParallelStrategy(ShardedStrategy):
    """Tensor parallelism and/or FSDP2 as the user's ``parallelize_fn`` applies them over a 2-D device mesh.

    ``parallelize_fn(module, device_mesh)`` returns the parallelized module. Without it the module
    must arrive already parallelized (the Trainer's ``configure_model`` does it with ``self.device_mesh``).
    ``save_distributed_checkpoint=True`` writes sharded checkpoint directories, ``False`` one full file.
    ``start_method`` picks the launcher as for DDP (``"popen"``, ``"spawn"``, ``"fork"``, ``"notebook"``).
    """

    def __init__(
        self,
        parallelize_fn: ParallelizeFn | None = None,
        data_parallel_size: MeshSize = "auto",
        tensor_parallel_size: MeshSize = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: datetime.timedelta = DEFAULT_TIMEOUT,
        start_method: str = "popen",
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        stall_timeout: datetime.timedelta | None = DEFAULT_STALL_TIMEOUT,
    ) -> None:
        if parallelize_fn is not None and not callable(parallelize_fn):
            raise ConfigurationError(
                f"parallelize_fn={parallelize_fn!r} is not callable. Valid: None, or a function "
                "(module, device_mesh) -> module."
            )
        _check_size("data_parallel_size", data_parallel_size)
        _check_size("tensor_parallel_size", tensor_parallel_size)
        if not isinstance(save_distributed_checkpoint, bool):
            raise ConfigurationError(
                f"save_distributed_checkpoint={save_distributed_checkpoint!r} is not valid. Valid: True, False."
            )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            state_dict_type="sharded" if save_distributed_checkpoint else "full",
            start_method=start_method,
            stall_timeout=stall_timeout,
        )
        self._parallelize_fn = parallelize_fn
        self._data_parallel_size = data_parallel_size
        self._tensor_parallel_size = tensor_parallel_size
        self._mesh_shape: tuple[int, int] | None = None

    @property
    def parallelize_fn(self) -> ParallelizeFn | None:
        return self._parallelize_fn

    # ------------------------------------------------------------------ mesh
    @override
    def setup_environment(self) -> None:
        # Check the mesh shape against the world size before any process joins a group: a wrong
        # size then fails on every rank at once instead of in the middle of a collective.
        self.set_world_ranks()
        self._mesh_shape = resolve_mesh_shape(
            self._data_parallel_size, self._tensor_parallel_size, self.world_size, self.num_nodes
        )
        super().setup_environment()

    @override
    def _build_device_mesh(self) -> DeviceMesh:
        from torch.distributed.device_mesh import init_device_mesh

        shape = self._mesh_shape or resolve_mesh_shape(
            self._data_parallel_size, self._tensor_parallel_size, self.world_size, self.num_nodes
        )
        return init_device_mesh(self.root_device.type, shape, mesh_dim_names=MESH_DIM_NAMES)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Only the data-parallel ranks split the data; a tensor-parallel group shares one slice."""
        data_parallel = self.device_mesh["data_parallel"]
        return {"num_replicas": data_parallel.size(), "rank": data_parallel.get_local_rank()}

    # ------------------------------------------------------------------ module
    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        """Applies ``parallelize_fn`` (or checks the module is already parallelized), then materializes meta tensors."""
        from torch.distributed.tensor import DTensor

        if self._parallelize_fn is not None:
            result = self._parallelize_fn(module, self.device_mesh)
            if not isinstance(result, nn.Module):
                raise ConfigurationError(
                    f"parallelize_fn={_name(self._parallelize_fn)} returned {type(result).__name__}, not an "
                    "nn.Module: it must return the parallelized module (return the module it was given)."
                )
            module = result
        elif not any(isinstance(p, DTensor) for p in module.parameters()):
            raise ConfigurationError(
                f"parallelize_fn missing: {type(module).__name__} has no DTensor parameters, so nothing split it over "
                "the device mesh. Pass ModelParallelStrategy(parallelize_fn=...) or parallelize the model in "
                "configure_model (with strategy.device_mesh)."
            )
        self.materialize(module)
        return module

    # ------------------------------------------------------------------ precision
    @override
    def adapt_precision(self, precision: Precision) -> Precision:
        """The precision to use with this strategy: ``precision`` itself if supported, else an error."""
        if precision.name not in SUPPORTED_PRECISIONS:
            raise ConfigurationError(
                f"precision={precision.name!r} is not supported by ModelParallelStrategy. "
                f"Valid: {choices(SUPPORTED_PRECISIONS)}."
            )
        return precision

    @override
    def __repr__(self) -> str:
        return (
            f"{super().__repr__()[:-1]}, data_parallel_size={self._data_parallel_size!r}, "
            f"tensor_parallel_size={self._tensor_parallel_size!r}, start_method={self._start_method!r})"
        )


def _name(function: object) -> str:
    return getattr(function, "__qualname__", None) or repr(function)
