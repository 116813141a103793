"""torchrun / ``torch.distributed.elastic``: the agent has started one process per device already.

The agent exports ``TORCHELASTIC_RUN_ID`` (the test behind ``torch.distributed.is_torchelastic_launched``)
with ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` (the node's index),
``MASTER_ADDR`` and ``MASTER_PORT``. All of them are read fresh on each call, because an elastic
restart may change them.
"""

from __future__ import annotations

import os
from typing import ClassVar

from typing_extensions import override

from torchloom.core.environments.environment import ClusterEnvironment, env_int, env_port
from torchloom.core.errors import ConfigurationError

__all__ = ["TorchElasticEnvironment"]

_WORKER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


class TorchElasticEnvironment(ClusterEnvironment):
    """A worker started by torchrun (or any ``torch.distributed.elastic`` agent)."""

    name: ClassVar[str] = "torchelastic"

    @staticmethod
    @override
    def detect() -> bool:
        # the same test as torch.distributed.is_torchelastic_launched(), without importing torch here,
        # plus the worker variables: an agent's own process has the run id but no rank yet
        return "TORCHELASTIC_RUN_ID" in os.environ and all(name in os.environ for name in _WORKER_VARIABLES)

    @property
    @override
    def creates_processes_externally(self) -> bool:
        return True

    @property
    @override
    def main_address(self) -> str:
        address = os.environ.get("MASTER_ADDR")
        if not address:
            raise ConfigurationError(
                "torchrun normally exports MASTER_ADDR, but it is not set in this worker; "
                "export MASTER_ADDR=<address of the rank-0 host> (and MASTER_PORT) before launching."
            )
        return address

    @property
    @override
    def main_port(self) -> int:
        return env_port("MASTER_PORT")

    @override
    def world_size(self) -> int:
        return env_int("WORLD_SIZE")

    @override
    def global_rank(self) -> int:
        return env_int("RANK")

    @override
    def local_rank(self) -> int:
        return env_int("LOCAL_RANK")

    @override
    def node_rank(self) -> int:
        return env_int("GROUP_RANK", 0)

    @override
    def validate(self, num_devices: int, num_nodes: int) -> None:
        world_size = self.world_size()
        local_world_size = env_int("LOCAL_WORLD_SIZE", 0) or None
        per_node = local_world_size or max(world_size // max(num_nodes, 1), 1)
        fix = (
            f"Pass devices={per_node} and num_nodes={max(world_size // per_node, 1)}, or launch with "
            f"`torchrun --nnodes={num_nodes} --nproc-per-node={num_devices}`."
        )
        if num_devices * num_nodes != world_size:
            raise ConfigurationError(
                f"torchrun started WORLD_SIZE={world_size} processes, but devices={num_devices} x "
                f"num_nodes={num_nodes} = {num_devices * num_nodes}. {fix}"
            )
        if local_world_size is not None and local_world_size != num_devices:
            raise ConfigurationError(
                f"torchrun started LOCAL_WORLD_SIZE={local_world_size} processes on this node, but "
                f"devices={num_devices}. {fix}"
            )
