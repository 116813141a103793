"""ParallelStrategy: several processes, one per device, joined by a ``torch.distributed`` process group."""

from __future__ import annotations

import datetime
from typing import Any, TypeVar

import torch
from typing_extensions import override

from torchloom.core import distributed, watchdog
from torchloom.core.accelerators.accelerator import Accelerator
from torchloom.core.checkpoint.io import CheckpointIO
from torchloom.core.environments.environment import ClusterEnvironment
from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.launchers.launcher import Launcher
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies.checks import check_parallel_arguments, check_wiring
from torchloom.core.strategies.strategy import ReduceOp, Strategy
from torchloom.core.utils import rank_zero

__all__ = ["DEFAULT_TIMEOUT", "START_METHODS", "ParallelStrategy", "check_start_method", "launcher_for"]

T = TypeVar("T")

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)

# How the workers of a one-process-per-device strategy come to exist:
# "popen": the script is run again as N workers under torch.distributed.elastic (the engine behind torchrun);
# "spawn" / "fork": torch.multiprocessing; "notebook": fork, refusing when CUDA is already initialised.
START_METHODS = ("popen", "spawn", "fork", "notebook")


class ParallelStrategy(Strategy):
    """Base of the multi-process strategies: ranks, world size, process group and real collectives.

    Ranks come from the cluster environment; ``set_world_ranks`` tells environments that do not read
    them from a scheduler (the local one) what they are. ``timeout`` bounds every collective: a rank
    that stalls makes its peers fail after it instead of hanging. Sooner than that, a rank whose peers
    have waited ``stall_timeout`` for it in a strategy call is named by the stall watchdog, which ends the
    job with ``watchdog.STALL_EXIT_CODE`` (see ``torchloom.core.watchdog``); ``None`` turns it off.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        watchdog.mark_calls(cls)  # a subclass's own backward, collectives, ... count as progress too

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: datetime.timedelta = DEFAULT_TIMEOUT,
        stall_timeout: datetime.timedelta | None = watchdog.DEFAULT_STALL_TIMEOUT,
    ) -> None:
        check_wiring(accelerator, precision, checkpoint_io)
        check_parallel_arguments(parallel_devices, cluster_environment, process_group_backend)
        super().__init__(accelerator=accelerator, precision=precision, checkpoint_io=checkpoint_io)
        if not isinstance(timeout, datetime.timedelta) or timeout.total_seconds() <= 0:
            raise ConfigurationError(f"timeout={timeout!r} is not valid: pass a positive datetime.timedelta.")
        self._parallel_devices = None if parallel_devices is None else list(parallel_devices)
        self._cluster_environment = cluster_environment
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._stall_timeout = watchdog.check_stall_timeout(stall_timeout)
        self._watchdog: watchdog.StallWatchdog | None = None
        self._num_nodes = 1
        self._local_rank: int | None = None  # set by a launcher that starts the workers itself
        self._created_process_group = False

    # ------------------------------------------------------------------ wiring
    @property
    def parallel_devices(self) -> list[torch.device]:
        if not self._parallel_devices:
            raise ConfigurationError(f"{type(self).__name__} has no parallel_devices yet; the connector sets them.")
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device]) -> None:
        self._parallel_devices = devices

    @property
    def cluster_environment(self) -> ClusterEnvironment:
        if self._cluster_environment is None:
            raise ConfigurationError(f"{type(self).__name__} has no cluster_environment yet; the connector sets it.")
        return self._cluster_environment

    @cluster_environment.setter
    def cluster_environment(self, environment: ClusterEnvironment) -> None:
        self._cluster_environment = environment

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise ConfigurationError(f"num_nodes={num_nodes!r} is not valid: pass an int >= 1.")
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        """Processes on this node (one per device)."""
        return len(self._parallel_devices) if self._parallel_devices else 0

    @property
    def process_group_backend(self) -> str:
        if self._process_group_backend is not None:
            return self._process_group_backend
        if self._accelerator is not None:
            return self._accelerator.distributed_backend
        return "gloo"

    @property
    def timeout(self) -> datetime.timedelta:
        return self._timeout

    @property
    def stall_timeout(self) -> datetime.timedelta | None:
        return self._stall_timeout

    # ------------------------------------------------------------------ topology
    @property
    @override
    def root_device(self) -> torch.device:
        return self.parallel_devices[self.local_rank]

    @property
    @override
    def global_rank(self) -> int:
        return self._cluster_environment.global_rank() if self._cluster_environment is not None else 0

    @property
    @override
    def local_rank(self) -> int:
        if self._local_rank is not None:
            return self._local_rank
        return self._cluster_environment.local_rank() if self._cluster_environment is not None else 0

    @local_rank.setter
    def local_rank(self, rank: int) -> None:
        """Set by a launcher in each worker it starts (the environment cannot know it)."""
        self._local_rank = rank

    @property
    @override
    def node_rank(self) -> int:
        return self._cluster_environment.node_rank() if self._cluster_environment is not None else 0

    @property
    @override
    def world_size(self) -> int:
        return self._cluster_environment.world_size() if self._cluster_environment is not None else 1

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

    def set_world_ranks(self) -> None:
        """Tells the environment this process's global rank and the world size (scheduler-run ones ignore it)."""
        environment = self.cluster_environment
        environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
        environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero.set_global_rank(environment.global_rank())

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup_environment(self) -> None:
        """Ranks, device, then the process group (skipped when one exists). Idempotent."""
        self.set_world_ranks()
        self.accelerator.setup_device(self.root_device)
        self._setup_process_group()

    def _setup_process_group(self) -> None:
        environment = self.cluster_environment
        created = distributed.init_process_group(
            self.process_group_backend,
            rank=environment.global_rank(),
            world_size=environment.world_size(),
            timeout=self.timeout,
            main_address=environment.main_address,
            main_port=environment.main_port,
        )
        self._created_process_group = self._created_process_group or created
        running = self._watchdog is not None and self._watchdog.running
        if self._stall_timeout is not None and not running and distributed.is_distributed() and self.world_size > 1:
            self._watchdog = watchdog.watch_default_group(self._stall_timeout)

    @override
    def teardown(self) -> None:
        if self._watchdog is not None:  # before the group goes: a peer's teardown is no stall
            self._watchdog.stop()
            self._watchdog = None
        if self._created_process_group:
            distributed.destroy_process_group()
            self._created_process_group = False
        if self._cluster_environment is not None:
            self._cluster_environment.teardown()
        super().teardown()

    # ------------------------------------------------------------------ collectives
    @override
    def all_reduce(self, tensor: Any, group: Any | None = None, reduce_op: ReduceOp = "mean") -> Any:
        return distributed.all_reduce(tensor, reduce_op=reduce_op, group=group)

    @override
    def all_gather(self, tensor: Any, group: Any | None = None, sync_grads: bool = False) -> Any:
        return distributed.all_gather(tensor, group=group, sync_grads=sync_grads)

    @override
    def broadcast(self, obj: T, src: int = 0) -> T:
        device = self.root_device if self.process_group_backend == "nccl" else None
        return distributed.broadcast_object(obj, src=src, device=device)

    @override
    def barrier(self, name: str | None = None) -> None:
        device_ids = [self.root_device.index] if self.process_group_backend == "nccl" else None
        distributed.barrier(device_ids=device_ids)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        # the vote must live where the backend can reduce it (nccl: on the GPU)
        device = self.root_device if self.process_group_backend == "nccl" else torch.device("cpu")
        return distributed.reduce_boolean_decision(decision, all=all, device=device)

    @override
    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(accelerator={self._accelerator!r}, precision={self._precision!r}, "
            f"num_nodes={self._num_nodes}, num_processes={self.num_processes}, "
            f"cluster_environment={self._cluster_environment!r})"
        )


watchdog.mark_calls(ParallelStrategy, inherited=True)  # the calls it inherits from Strategy


def check_start_method(start_method: str) -> str:
    """``start_method`` if it is one of ``START_METHODS``, else a ``ConfigurationError`` listing them."""
    if start_method not in START_METHODS:
        raise ConfigurationError(f"start_method={start_method!r} is not valid. Valid: {choices(START_METHODS)}.")
    return start_method


def launcher_for(strategy: ParallelStrategy, start_method: str) -> Launcher:
    """The launcher that starts ``strategy``'s workers with ``start_method`` (one of ``START_METHODS``)."""
    if check_start_method(start_method) == "popen":
        from torchloom.core.launchers.subprocess_script import SubprocessScriptLauncher

        return SubprocessScriptLauncher(
            strategy.cluster_environment,
            strategy.num_processes,
            strategy.num_nodes,
            timeout=strategy.timeout,
            worker_setup=strategy.setup_environment,
        )
    from torchloom.core.launchers.multiprocessing import MultiprocessingLauncher

    return MultiprocessingLauncher(strategy, start_method=start_method)
