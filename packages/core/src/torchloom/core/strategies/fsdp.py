"""FSDPStrategy (``"fsdp"``): fully sharded data parallel, built on ``torch.distributed.fsdp.fully_shard``.

Each rank holds ``1/N`` of every sharded parameter (a DTensor over the mesh); ``fully_shard`` gathers a
unit's parameters for its forward and backward and reduce-scatters its gradients. ``setup_module``:

1. activation checkpointing on the submodules ``activation_checkpointing_policy`` selects (their
   activations are recomputed in backward instead of kept);
2. ``fully_shard`` on each submodule ``auto_wrap_policy`` selects, innermost first, then on the root;
3. meta-device parameters (``module_init_context(empty_init=True)``) materialised, each rank its shard.

Policies are a set of module classes, or a callable ``(module, qualified_name) -> bool``.
"""

from __future__ import annotations

import datetime
import functools
import inspect
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from typing_extensions import override

from torchloom.core.accelerators.accelerator import Accelerator
from torchloom.core.checkpoint.io import CheckpointIO
from torchloom.core.environments.environment import ClusterEnvironment
from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.precision.fsdp import FSDPPrecision
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies.parallel import DEFAULT_TIMEOUT
from torchloom.core.strategies.sharded import ShardedStrategy
from torchloom.core.watchdog import DEFAULT_STALL_TIMEOUT

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

__all__ = ["SHARDING_STRATEGIES", "FSDPStrategy", "ModulePolicy"]

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")
ModulePolicy = Collection[type[nn.Module]] | Callable[[nn.Module, str], bool]
_SET_BY_STRATEGY = ("mesh", "reshard_after_forward", "mp_policy", "offload_policy")


class FSDPStrategy(ShardedStrategy):
    """Fully sharded data parallel training over a 1-D mesh (2-D for ``"HYBRID_SHARD"`` / ``"NO_SHARD"``).

    ``sharding_strategy``: ``"FULL_SHARD"`` (parameters resharded after forward), ``"SHARD_GRAD_OP"``
    (kept gathered from forward to backward), ``"NO_SHARD"`` (a replica per rank, like DDP: a
    ``(world, 1)`` mesh), ``"HYBRID_SHARD"`` (sharded within a node, replicated across nodes;
    ``device_mesh=(replicate, shard)`` sets other sizes). ``reshard_after_forward`` (default: from
    ``sharding_strategy``), ``mixed_precision`` (default: from the precision) and extra
    ``fully_shard_kwargs`` go to ``fully_shard``. ``cpu_offload`` keeps the shards on the CPU.
    """

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: datetime.timedelta = DEFAULT_TIMEOUT,
        start_method: str = "popen",
        auto_wrap_policy: ModulePolicy | None = None,
        activation_checkpointing_policy: ModulePolicy | None = None,
        cpu_offload: bool | CPUOffloadPolicy = False,
        mixed_precision: MixedPrecisionPolicy | None = None,
        reshard_after_forward: bool | int | None = None,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: str = "sharded",
        device_mesh: tuple[int, int] | DeviceMesh | None = None,
        stall_timeout: datetime.timedelta | None = DEFAULT_STALL_TIMEOUT,
        **fully_shard_kwargs: Any,
    ) -> None:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=None if precision is None else FSDPPrecision.from_precision(precision),
            process_group_backend=process_group_backend,
            timeout=timeout,
            state_dict_type=state_dict_type,
            start_method=start_method,
            stall_timeout=stall_timeout,
        )
        if sharding_strategy not in SHARDING_STRATEGIES:
            raise ConfigurationError(
                f"sharding_strategy={sharding_strategy!r} is not valid. Valid: {choices(SHARDING_STRATEGIES)}."
            )
        gathered = sharding_strategy in ("SHARD_GRAD_OP", "NO_SHARD")  # parameters stay gathered after forward
        if gathered and reshard_after_forward not in (None, False):
            raise ConfigurationError(
                f"reshard_after_forward={reshard_after_forward!r} contradicts sharding_strategy={sharding_strategy!r}, "
                "which keeps parameters gathered after forward. Valid: leave it unset, or sharding_strategy="
                "'FULL_SHARD'."
            )
        if not (isinstance(device_mesh, (tuple, DeviceMesh)) or device_mesh is None) or (
            isinstance(device_mesh, tuple) and sharding_strategy != "HYBRID_SHARD"
        ):
            raise ConfigurationError(
                f"device_mesh={device_mesh!r} is not valid with sharding_strategy={sharding_strategy!r}. Valid: a "
                "DeviceMesh, a (replicate, shard) tuple of sizes with 'HYBRID_SHARD', or None."
            )
        if not isinstance(cpu_offload, (bool, CPUOffloadPolicy)):
            raise ConfigurationError(
                f"cpu_offload={cpu_offload!r} is not valid. Valid: True, False, a CPUOffloadPolicy."
            )
        if mixed_precision is not None and not isinstance(mixed_precision, MixedPrecisionPolicy):
            raise ConfigurationError(
                f"mixed_precision={mixed_precision!r} is not valid. Valid: a torch.distributed.fsdp.MixedPrecisionPolicy"
                ", or None to derive it from the precision."
            )
        accepted = [p for p in inspect.signature(fully_shard).parameters if p != "module" and p not in _SET_BY_STRATEGY]
        unknown = sorted(set(fully_shard_kwargs) - set(accepted))
        if unknown:
            raise ConfigurationError(
                f"FSDPStrategy got unknown arguments {unknown}. Valid extra fully_shard arguments: {choices(accepted)}."
            )
        self._sharding_strategy = sharding_strategy
        self._reshard_after_forward = not gathered if reshard_after_forward is None else reshard_after_forward
        self._auto_wrap_policy = _as_policy("auto_wrap_policy", auto_wrap_policy)
        self._checkpointing_policy = _as_policy("activation_checkpointing_policy", activation_checkpointing_policy)
        self._cpu_offload = cpu_offload
        self._mixed_precision = mixed_precision
        self._mesh_arg = device_mesh
        self._fully_shard_kwargs = fully_shard_kwargs

    @property
    def sharding_strategy(self) -> str:
        return self._sharding_strategy

    @override
    def adapt_precision(self, precision: Precision) -> Precision:
        """The ``FSDPPrecision`` for ``precision``; unsupported ones are refused with the supported list."""
        return FSDPPrecision.from_precision(precision)

    @override
    def _build_device_mesh(self) -> DeviceMesh:
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        if isinstance(self._mesh_arg, DeviceMesh):
            return self._mesh_arg
        world = self.world_size
        if self._sharding_strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
            return init_device_mesh(self.root_device.type, (world,), mesh_dim_names=("shard",))
        if self._sharding_strategy == "NO_SHARD":
            shape = (world, 1)
        else:  # HYBRID_SHARD: shard within a node, replicate across nodes
            shape = self._mesh_arg or (self.num_nodes, world // self.num_nodes)
        if shape[0] * shape[1] != world:
            raise ConfigurationError(
                f"device_mesh={shape} (replicate x shard) does not multiply to the world size {world}. Valid: two "
                f"sizes whose product is {world}."
            )
        return init_device_mesh(self.root_device.type, shape, mesh_dim_names=("replicate", "shard"))

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        """Checkpointing, then ``fully_shard`` per policy (innermost first) and on the root; returns ``module``."""
        from torch.distributed.fsdp import fully_shard

        named = list(module.named_modules())
        to_wrap = [sub for name, sub in reversed(named) if name and self._auto_wrap_policy(sub, name)]
        wrappers = self._apply_activation_checkpointing(module, named)
        options = {
            "mesh": self.device_mesh,
            "reshard_after_forward": self._reshard_after_forward,
            "mp_policy": self._mixed_precision_policy(),
            "offload_policy": self._offload_policy(),
            **self._fully_shard_kwargs,
        }
        for sub in to_wrap:
            fully_shard(wrappers.get(id(sub), sub), **options)  # a checkpointed unit is sharded with its wrapper
        fully_shard(module, **options)
        offloaded = not isinstance(self._cpu_offload, bool) or self._cpu_offload
        self.materialize(module, torch.device("cpu") if offloaded else None)  # offloaded shards live on the CPU
        return module

    def _apply_activation_checkpointing(
        self, module: nn.Module, named: list[tuple[str, nn.Module]]
    ) -> dict[int, nn.Module]:
        """Wraps the selected submodules (non-reentrant checkpointing); returns id(inner) -> its wrapper."""
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            CheckpointWrapper,
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )

        selected = {id(sub) for name, sub in named if name and self._checkpointing_policy(sub, name)}
        if not selected:
            return {}
        apply_activation_checkpointing(
            module,
            checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda sub: id(sub) in selected,
        )
        return {
            id(sub._checkpoint_wrapped_module): sub for sub in module.modules() if isinstance(sub, CheckpointWrapper)
        }

    def _mixed_precision_policy(self) -> MixedPrecisionPolicy:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self._mixed_precision is not None:
            return self._mixed_precision
        precision = self.precision
        return precision.mixed_precision_policy if isinstance(precision, FSDPPrecision) else MixedPrecisionPolicy()

    def _offload_policy(self) -> OffloadPolicy:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

        if self._cpu_offload is False:
            return OffloadPolicy()
        # pinned memory needs an accelerator: with CPU devices, pinning raises "Cannot access accelerator device"
        pin = self.root_device.type != "cpu"
        if self._cpu_offload is True:
            return CPUOffloadPolicy(pin_memory=pin)
        return self._cpu_offload if pin else CPUOffloadPolicy(pin_memory=False)

    @override
    def __repr__(self) -> str:
        return (
            f"{super().__repr__()[:-1]}, sharding_strategy={self._sharding_strategy!r}, "
            f"state_dict_type={self.state_dict_type!r}, cpu_offload={self._cpu_offload!r})"
        )


def _as_policy(argument: str, policy: ModulePolicy | None) -> Callable[[nn.Module, str], bool]:
    """A set of module classes or a callable, as one ``(module, name) -> bool``; ``None`` selects nothing."""
    if policy is None:
        return lambda module, name: False
    if isinstance(policy, Collection) and all(isinstance(c, type) and issubclass(c, nn.Module) for c in policy):
        classes = tuple(policy)
        return lambda module, name: isinstance(module, classes)
    if callable(policy):
        return policy
    raise ConfigurationError(
        f"{argument}={policy!r} is not valid. Valid: a set of nn.Module classes, a callable "
        "(module, qualified_name) -> bool, or None."
    )
