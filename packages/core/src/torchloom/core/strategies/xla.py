"""XLAStrategy (``"xla"``): one process per XLA device (TPU chip), started by torch-xla; data parallel.

Each replica holds the whole model and its own share of the data (a distributed sampler). Gradients are
averaged across replicas in the optimizer step (``xm.optimizer_step``), or before clipping when the
product clips, so clipping sees the global gradients and the step does not average twice. There is no
``torch.distributed`` process group: collectives are torch-xla's (``xm.all_reduce``, ``xm.all_gather``,
``xm.rendezvous``), and ranks come from its runtime (``XLAEnvironment``).

XLA's CPU backend cannot run collectives across replicas (they hang: pytorch/xla#9089), so on the CPU only
one replica really runs; the multi-replica paths are exercised on TPU hosts.
"""

from __future__ import annotations

import contextlib
import datetime
import pickle
from collections.abc import Generator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from torchloom.core.accelerators.accelerator import Accelerator
from torchloom.core.accelerators.xla import import_torch_xla
from torchloom.core.checkpoint.io import CheckpointIO
from torchloom.core.environments.environment import ClusterEnvironment
from torchloom.core.environments.xla import XLAEnvironment
from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies.parallel import ParallelStrategy
from torchloom.core.strategies.strategy import ReduceOp
from torchloom.core.strategies.xla_ops import XLAStrategyBase, xla_optimizer_step
from torchloom.core.utils import rank_zero
from torchloom.core.utils.collections import apply_to_collection

__all__ = ["XLAStrategy"]

T = TypeVar("T")
_REDUCE_OPS = ("mean", "sum", "max", "min")


class XLAStrategy(XLAStrategyBase, ParallelStrategy):
    """Data parallel over XLA devices, one process each (``torch_xla.launch``)."""

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        start_method: str = "spawn",
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment or XLAEnvironment(),
            checkpoint_io=checkpoint_io,
            precision=precision,
            process_group_backend="xla",
            timeout=datetime.timedelta(minutes=30),
            stall_timeout=None,  # the watchdog needs a torch.distributed store; XLA has none
        )
        if start_method not in ("spawn", "fork"):
            raise ConfigurationError(
                f"XLAStrategy(start_method={start_method!r}) is not valid. Valid: 'spawn', 'fork'."
            )
        self._start_method = start_method
        self._device: torch.device | None = None  # set in the worker: the device torch-xla gave it
        self._reduced: set[int] = set()  # optimizers whose gradients were averaged since their last step

    # ------------------------------------------------------------------ wiring
    @override
    def configure_launcher(self) -> None:
        from torchloom.core.launchers.xla import XLALauncher

        self._launcher = XLALauncher(self, start_method=self._start_method)

    # ------------------------------------------------------------------ topology
    @property
    @override
    def root_device(self) -> torch.device:
        return self._device if self._device is not None else self.parallel_devices[self.local_rank]

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    @override
    def set_world_ranks(self) -> None:
        """Nothing before launch: the ranks are torch-xla's, and asking would start its runtime in the parent."""

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup_environment(self) -> None:
        """In a worker: the device torch-xla assigned, and the rank for rank-zero-only output. No process group."""
        self._device = import_torch_xla("torch_xla", type(self).__name__).device()
        rank_zero.set_global_rank(self.global_rank)
        self.accelerator.setup_device(self.root_device)

    # ------------------------------------------------------------------ modules, data, the step
    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        return module  # replicas start equal: every process builds the model from the same seed

    @override
    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        reduced = id(optimizer) in self._reduced
        self._reduced.discard(id(optimizer))
        return xla_optimizer_step(optimizer, gradients_reduced=reduced, **kwargs)

    def reduce_gradients(self, optimizer: Optimizer) -> None:
        """Averages ``optimizer``'s gradients over the replicas now, once per step (clipping needs them global)."""
        if id(optimizer) not in self._reduced:
            import_torch_xla("torch_xla.core.xla_model", type(self).__name__).reduce_gradients(optimizer)
            self._reduced.add(id(optimizer))

    @override
    def clip_gradients_norm(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = True,
    ) -> Tensor:
        self.reduce_gradients(optimizer)
        return super().clip_gradients_norm(module, optimizer, max_norm, norm_type, error_if_nonfinite)

    @override
    def clip_gradients_value(self, module: nn.Module, optimizer: Optimizer, clip_val: float) -> None:
        self.reduce_gradients(optimizer)
        super().clip_gradients_value(module, optimizer, clip_val)

    @override
    @contextlib.contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Generator[None, None, None]:
        yield  # gradients are averaged in the optimizer step, never in backward: accumulation needs nothing

    # ------------------------------------------------------------------ collectives (torch-xla's)
    @override
    def all_reduce(self, tensor: Any, group: Any | None = None, reduce_op: ReduceOp = "mean") -> Any:
        if reduce_op not in _REDUCE_OPS:
            raise ConfigurationError(f"reduce_op={reduce_op!r} is not valid here. Valid: {choices(_REDUCE_OPS)}.")
        xm = import_torch_xla("torch_xla.core.xla_model", type(self).__name__)
        kind = {"mean": xm.REDUCE_SUM, "sum": xm.REDUCE_SUM, "max": xm.REDUCE_MAX, "min": xm.REDUCE_MIN}[reduce_op]
        scale = 1.0 / self.world_size if reduce_op == "mean" else 1.0

        def reduce(value: Tensor) -> Tensor:
            return xm.all_reduce(kind, value.to(self.root_device), scale=scale, groups=group)  # type: ignore[no-any-return]

        return apply_to_collection(tensor, Tensor, reduce)

    @override
    def all_gather(self, tensor: Any, group: Any | None = None, sync_grads: bool = False) -> Any:
        xm = import_torch_xla("torch_xla.core.xla_model", type(self).__name__)

        def gather(value: Tensor) -> Tensor:
            return xm.all_gather(value.to(self.root_device).unsqueeze(0), dim=0, groups=group)  # type: ignore[no-any-return]

        return apply_to_collection(tensor, Tensor, gather)

    @override
    def broadcast(self, obj: T, src: int = 0) -> T:
        xm = import_torch_xla("torch_xla.core.xla_model", type(self).__name__)
        payload = pickle.dumps(obj) if self.global_rank == src else b""
        received: T = pickle.loads(xm.rendezvous("torchloom.broadcast", payload)[src])
        return received

    @override
    def barrier(self, name: str | None = None) -> None:
        import_torch_xla("torch_xla.core.xla_model", type(self).__name__).rendezvous(name or "torchloom.barrier")

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        votes = self.all_reduce(torch.tensor(int(decision), device=self.root_device), reduce_op="sum")
        count = int(votes.item())
        return count == self.world_size if all else count > 0

    @override
    def teardown(self) -> None:
        self._reduced.clear()
        super().teardown()
