"""The default environment: torchloom starts the worker processes itself, on this machine.

Variables read (all optional):

- ``MASTER_ADDR``: address of node 0 (default ``127.0.0.1``);
- ``MASTER_PORT``: rendezvous port; when unset a free port is picked once and exported, so the
  workers torchloom starts afterwards inherit the same one;
- ``LOCAL_RANK``: set in a worker torchloom started (or one a user's own launcher started); its
  presence means the processes already exist;
- ``NODE_RANK`` (else ``GROUP_RANK``): index of this machine in a multi-machine run (default 0).

World size and global rank are not read from the environment: the strategy sets them.
"""

from __future__ import annotations

import os
import socket
from typing import ClassVar

from typing_extensions import override

from torchloom.core.environments.environment import ClusterEnvironment, env_int, env_port
from torchloom.core.errors import ConfigurationError

__all__ = ["LocalEnvironment", "find_free_port"]


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now, chosen by the kernel (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class LocalEnvironment(ClusterEnvironment):
    """torchloom launches the processes: one per device on each machine."""

    name: ClassVar[str] = "local"

    def __init__(self) -> None:
        self._world_size = 1
        self._global_rank = 0
        self._exported_port: int | None = None  # the free port we picked and put into MASTER_PORT

    @staticmethod
    @override
    def detect() -> bool:
        return True  # the fallback: any process can start its own workers

    @property
    @override
    def creates_processes_externally(self) -> bool:
        return "LOCAL_RANK" in os.environ

    @property
    @override
    def main_address(self) -> str:
        return os.environ.get("MASTER_ADDR", "127.0.0.1")

    @property
    @override
    def main_port(self) -> int:
        if "MASTER_PORT" not in os.environ:
            self._exported_port = find_free_port()
            os.environ["MASTER_PORT"] = str(self._exported_port)
        return env_port("MASTER_PORT")

    @override
    def world_size(self) -> int:
        return self._world_size

    @override
    def set_world_size(self, size: int) -> None:
        self._world_size = size

    @override
    def global_rank(self) -> int:
        return self._global_rank

    @override
    def set_global_rank(self, rank: int) -> None:
        self._global_rank = rank

    @override
    def local_rank(self) -> int:
        return env_int("LOCAL_RANK", 0)

    @override
    def node_rank(self) -> int:
        if "NODE_RANK" in os.environ:
            return env_int("NODE_RANK")
        return env_int("GROUP_RANK", 0)

    @override
    def validate(self, num_devices: int, num_nodes: int) -> None:
        if num_nodes <= 1:
            return
        # Every machine must reach node 0 on an agreed port; a free port picked here is known only here.
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise ConfigurationError(
                f"num_nodes={num_nodes} without a cluster scheduler needs {' and '.join(missing)} in the environment. "
                f"On every machine set MASTER_ADDR=<address of node 0>, MASTER_PORT=<a free port on node 0> and "
                f"NODE_RANK=<0..{num_nodes - 1}>, or launch with torchrun / srun."
            )
        if not 0 <= self.node_rank() < num_nodes:
            raise ConfigurationError(
                f"NODE_RANK={self.node_rank()} is out of range for num_nodes={num_nodes}; "
                f"use a value in 0..{num_nodes - 1}."
            )

    @override
    def teardown(self) -> None:
        # Forget the port we chose: the next run in this process must not collide with a lingering socket.
        if self._exported_port is not None and os.environ.get("MASTER_PORT") == str(self._exported_port):
            del os.environ["MASTER_PORT"]
        self._exported_port = None
