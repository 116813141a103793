"""XLASPMDStrategy (``"xla_spmd"``): one process drives every XLA device of the host as one SPMD program.

torch-xla's SPMD mode (``torch_xla.runtime.use_spmd()``) compiles the single-device program once for a
device mesh: the strategy builds a mesh over all devices (``(n, 1)``, axes ``(axis, "model")``), shards
each batch along its first dimension on that axis (``mark_sharding``), and with ``sharding="fsdp"``
wraps the module in torch-xla's FSDPv2 (``SpmdFullyShardedDataParallel``), which shards every parameter
on the ``"fsdp"`` axis. The compiler inserts the collectives. ``sharding="data"`` keeps parameters
replicated (sharded data parallel). Data is not split by a sampler: the one process loads the global
batch. Checkpoints are the sharded directories FSDP writes too (``checkpoint/distributed.py``), written and
read shard by shard with torch-xla's DCP planners; they load on any strategy, and FSDP's load here.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from torchloom.core.accelerators.accelerator import Accelerator
from torchloom.core.accelerators.xla import import_torch_xla
from torchloom.core.checkpoint import distributed as sharded_io
from torchloom.core.checkpoint.checks import check_entries
from torchloom.core.checkpoint.io import CheckpointIO
from torchloom.core.checkpoint.xla_spmd import inner_module, live_targets, owner_module, shard_like_parameters
from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies.single_xla import SingleDeviceXLAStrategy
from torchloom.core.strategies.strategy import StateFilter
from torchloom.core.utils.collections import apply_to_collection

__all__ = ["SHARDINGS", "XLASPMDStrategy"]

SHARDINGS = ("fsdp", "data")


class XLASPMDStrategy(SingleDeviceXLAStrategy):
    """SPMD over all local XLA devices: ``sharding="fsdp"`` (FSDPv2, the default) or ``"data"``."""

    # the connector lets it take several devices although it runs one process (it uses all of them)
    drives_all_local_devices = True
    restore_checkpoint_after_setup = True  # the Trainer reads its sharded checkpoints into the sharded module

    def __init__(
        self,
        sharding: str = "fsdp",
        accelerator: Accelerator | None = None,
        precision: Precision | None = None,
        checkpoint_io: CheckpointIO | None = None,
    ) -> None:
        if not isinstance(sharding, str) or sharding not in SHARDINGS:
            raise ConfigurationError(
                f"XLASPMDStrategy(sharding={sharding!r}) is not valid. Valid: {choices(SHARDINGS)}."
            )
        super().__init__(device="xla:0", accelerator=accelerator, precision=precision, checkpoint_io=checkpoint_io)
        self._sharding = sharding
        self._mesh: Any = None

    @property
    def sharding(self) -> str:
        return self._sharding

    @property
    def axis(self) -> str:
        """The mesh axis that batches (and, with FSDPv2, parameters) are sharded on."""
        return "fsdp" if self._sharding == "fsdp" else "data"

    @property
    def mesh(self) -> Any:
        """The ``torch_xla.distributed.spmd.Mesh`` over every device (built by ``setup_environment``)."""
        if self._mesh is None:
            raise ConfigurationError("XLASPMDStrategy has no mesh yet: it is built by setup_environment().")
        return self._mesh

    @override
    def setup_environment(self) -> None:
        if self._mesh is not None:
            return
        runtime = import_torch_xla("torch_xla.runtime", "XLASPMDStrategy")
        runtime.use_spmd()  # before the first XLA tensor: tensors made earlier are replicated, with a warning
        super().setup_environment()
        spmd = import_torch_xla("torch_xla.distributed.spmd", "XLASPMDStrategy")
        import numpy as np

        count = runtime.global_runtime_device_count()
        self._mesh = spmd.Mesh(np.arange(count), (count, 1), (self.axis, "model"))
        spmd.set_global_mesh(self._mesh)

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        if self._sharding == "data":
            return module
        fsdp = import_torch_xla("torch_xla.experimental.spmd_fully_sharded_data_parallel", "XLASPMDStrategy")
        # our own output sharding: FSDPv2's refuses outputs that are not one tensor (a step returning a dict, None)
        return fsdp.SpmdFullyShardedDataParallel(  # type: ignore[no-any-return]
            module, mesh=self.mesh, shard_output=lambda output, mesh: self._shard_batch_dim(output)
        )

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None) -> Any:
        """Moves ``batch`` and shards each tensor's first dimension over the mesh (replicated if it does not divide)."""
        target = device or self.root_device
        return self._shard_batch_dim(apply_to_collection(batch, Tensor, lambda tensor: tensor.to(target)))

    def _shard_batch_dim(self, data: Any) -> Any:
        """Shards the first dimension of each XLA tensor in ``data`` on the mesh axis, where it divides evenly."""
        spmd = import_torch_xla("torch_xla.distributed.spmd", "XLASPMDStrategy")
        mesh = self.mesh
        devices = len(mesh.device_ids)

        def shard(tensor: Tensor) -> Tensor:
            if tensor.device.type == "xla" and tensor.dim() > 0 and tensor.shape[0] % devices == 0:
                spmd.mark_sharding(tensor, mesh, (self.axis, *([None] * (tensor.dim() - 1))))
            return tensor

        return apply_to_collection(data, Tensor, shard)

    @override
    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        return inner_module(module).state_dict()

    @override
    def load_module_state_dict(self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
        inner_module(module).load_state_dict(state_dict, strict=strict)

    @override
    def load_optimizer_state(
        self, optimizer: Optimizer, state_dict: dict[str, Any], module: nn.Module | None = None
    ) -> None:
        super().load_optimizer_state(optimizer, state_dict, module)
        shard_like_parameters(optimizer)  # state read whole lands replicated on every device

    @override
    def convert_state(self, state: dict[str, Any], filter: StateFilter | None = None) -> dict[str, Any]:
        """Like the base, with optimizer state keyed by parameter name, as sharded checkpoints hold it."""
        converted = super().convert_state(state, filter)
        for key, obj in state.items():
            optimizers = sharded_io.as_optimizers(obj)
            if optimizers is None:
                continue
            values = [converted[key]] if isinstance(obj, Optimizer) else converted[key]
            named = [
                sharded_io.optimizer_state_to_named(value, sharded_io.parameter_names(owner_module(o, state, key), o))
                for o, value in zip(optimizers, values, strict=True)
            ]
            converted[key] = named[0] if isinstance(obj, Optimizer) else named
        return converted

    @override
    def save_checkpoint(
        self, path: str | os.PathLike[str], state: dict[str, Any], filter: StateFilter | None = None
    ) -> None:
        """A sharded checkpoint directory at ``path`` (as FSDP writes), each shard written from its device."""
        planners = import_torch_xla("torch_xla.experimental.distributed_checkpoint", "XLA SPMD checkpoints")
        checkpoint = self.convert_state(state, filter)
        with _quiet_planner():
            sharded_io.save_sharded(path, checkpoint, sharded_io.kinds_of(state), self, planners.SPMDSavePlanner())

    @override
    def read_checkpoint(
        self, path: str | os.PathLike[str], state: dict[str, Any], strict: bool = True, weights_only: bool = True
    ) -> Any:
        """A sharded directory is read shard by shard straight into the devices: modules into their sharded
        parameters, optimizer state into tensors sharded like its parameters (``checkpoint/xla_spmd.py``);
        plain values to the CPU. Any other checkpoint is read as the base strategy reads it."""
        if not sharded_io.is_sharded_checkpoint(path):
            return super().read_checkpoint(path, state, strict=strict, weights_only=weights_only)
        meta = sharded_io.read_meta(path)  # also refuses a DCP .metadata that would run code
        check_entries(path, state, meta["kinds"], strict)  # before anything is loaded in place
        live = live_targets(path, meta, state, strict)
        # every live tensor backed by device data, none with work in flight: the planner reads their shards
        import_torch_xla("torch_xla", "XLA SPMD checkpoints").sync(wait=True)
        planners = import_torch_xla("torch_xla.experimental.distributed_checkpoint", "XLA SPMD checkpoints")
        with _quiet_planner():
            checkpoint = sharded_io.load_sharded(
                path, live, meta=meta, distributed=False, planner=planners.SPMDLoadPlanner()
            )
        for key in live:  # read in place, so maybe keyed by parameter name: the optimizers want their own form
            if isinstance(state[key], Optimizer):
                checkpoint[key] = sharded_io.to_indexed(checkpoint[key])
            elif sharded_io.as_optimizers(state[key]) is not None:
                checkpoint[key] = [sharded_io.to_indexed(value) for value in checkpoint[key]]
        return checkpoint

    @override
    def __repr__(self) -> str:
        return f"{type(self).__name__}(sharding={self._sharding!r}, precision={self._precision!r})"


@contextlib.contextmanager
def _quiet_planner() -> Iterator[None]:
    """torch-xla 2.9's planners predate a newer DCP planner argument, which DCP warns about on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*set_up_planner has been updated", category=UserWarning)
        yield
