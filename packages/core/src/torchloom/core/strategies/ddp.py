"""DDPStrategy: a full replica of the model per process; gradients are averaged during backward.

``start_method`` picks how the worker processes come to exist:

- ``"popen"`` (registered as ``"ddp"``): the script is run again as N workers under
  ``torch.distributed.elastic`` (the engine behind torchrun); the calling process supervises them
  and then exits (code 0 when all succeeded), so code after ``launch`` runs in the workers only.
- ``"spawn"`` (``"ddp_spawn"``): fresh interpreters; the launched function and its arguments must pickle.
- ``"fork"`` (``"ddp_fork"``): forked copies of this process; nothing needs to pickle.
- ``"notebook"`` (``"ddp_notebook"``): fork, refusing when CUDA is already initialised in the parent.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
from collections.abc import Generator
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from torchloom.core.accelerators.accelerator import Accelerator
from torchloom.core.checkpoint.io import CheckpointIO
from torchloom.core.environments.environment import ClusterEnvironment
from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies.parallel import (
    DEFAULT_TIMEOUT,
    START_METHODS,
    ParallelStrategy,
    check_start_method,
    launcher_for,
)
from torchloom.core.watchdog import DEFAULT_STALL_TIMEOUT

__all__ = ["START_METHODS", "DDPStrategy"]

_SET_BY_STRATEGY = ("module", "device_ids")  # DistributedDataParallel arguments setup_module passes itself


class DDPStrategy(ParallelStrategy):
    """Data-parallel training with ``torch.nn.parallel.DistributedDataParallel``.

    ``ddp_kwargs`` go to ``DistributedDataParallel`` unchanged (``find_unused_parameters``,
    ``static_graph``, ``gradient_as_bucket_view``, ...).
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
        stall_timeout: datetime.timedelta | None = DEFAULT_STALL_TIMEOUT,
        **ddp_kwargs: Any,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            stall_timeout=stall_timeout,
        )
        self._start_method = check_start_method(start_method)
        parameters = inspect.signature(DistributedDataParallel).parameters
        accepted = [name for name in parameters if name not in _SET_BY_STRATEGY]
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        unknown = [] if takes_any else sorted(set(ddp_kwargs) - set(accepted))
        if unknown:  # caught here, not when the wrapper is built inside every worker
            raise ConfigurationError(
                f"DDPStrategy got unknown arguments {unknown}. Valid extra DistributedDataParallel arguments: "
                f"{choices(accepted)}."
            )
        self._ddp_kwargs = ddp_kwargs

    @property
    def start_method(self) -> str:
        return self._start_method

    @override
    def configure_launcher(self) -> None:
        self._launcher = launcher_for(self, self._start_method)

    @override
    def setup_module(self, module: nn.Module) -> DistributedDataParallel:
        """Wraps ``module`` (already on ``root_device``) in ``DistributedDataParallel``."""
        device_ids = [self.root_device.index] if self.root_device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, **self._ddp_kwargs)

    @override
    @contextlib.contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Generator[None, None, None]:
        """Backward calls inside it only accumulate local gradients; the next synced backward averages all."""
        if not enabled:
            yield
            return
        if not isinstance(module, DistributedDataParallel):
            raise ConfigurationError(
                f"no_backward_sync needs the module that DDPStrategy.setup_module returned "
                f"(a DistributedDataParallel), got {type(module).__name__}."
            )
        with module.no_sync():
            yield

    @override
    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, start_method={self._start_method!r})"
