"""The ClusterEnvironment contract: where this process sits in the job, read from the scheduler."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import ClassVar

from torchloom.core.errors import ConfigurationError

__all__ = ["ClusterEnvironment", "env_int", "env_port", "port_from_job_id"]


class ClusterEnvironment(ABC):
    """Reads a scheduler's (or launcher's) standard environment variables.

    ``creates_processes_externally`` is True when something else (torchrun, srun, mpirun) has
    already started one process per device, so torchloom must not launch workers itself.
    """

    name: ClassVar[str]

    @staticmethod
    @abstractmethod
    def detect() -> bool:
        """Whether this process runs under this environment."""

    @property
    @abstractmethod
    def creates_processes_externally(self) -> bool: ...

    @property
    @abstractmethod
    def main_address(self) -> str:
        """Address of the rank-0 host, for the process group's rendezvous."""

    @property
    @abstractmethod
    def main_port(self) -> int: ...

    @abstractmethod
    def world_size(self) -> int: ...

    def set_world_size(self, size: int) -> None:
        """Environments that read the world size from the scheduler ignore this."""

    @abstractmethod
    def global_rank(self) -> int: ...

    def set_global_rank(self, rank: int) -> None:
        """Environments that read the rank from the scheduler ignore this."""

    @abstractmethod
    def local_rank(self) -> int: ...

    @abstractmethod
    def node_rank(self) -> int: ...

    def validate(self, num_devices: int, num_nodes: int) -> None:
        """Raises ``ConfigurationError`` when the requested devices/nodes contradict the scheduler."""

    def teardown(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def env_int(name: str, default: int | None = None) -> int:
    """The integer in environment variable ``name``; ``default`` when unset (an error if there is none)."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise ConfigurationError(
                f"The environment variable {name} is not set, but this cluster environment needs it."
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(f"The environment variable {name}={raw!r} is not an integer.") from None


def env_port(name: str, default: int | None = None) -> int:
    """Like ``env_int``, and the value must be a TCP port (1-65535)."""
    port = env_int(name, default)
    if not 0 < port < 65536:
        raise ConfigurationError(f"The environment variable {name}={port} is not a TCP port; use a value in 1-65535.")
    return port


def port_from_job_id(job_id: str) -> int:
    """A rendezvous port every rank of a scheduler job computes alike, without talking to the others.

    It lies in 12000-31999: above the well-known services and below Linux's ephemeral range (32768+),
    so the kernel does not hand it to some other outgoing connection first.
    """
    digits = "".join(ch for ch in job_id if ch.isdigit())
    if not digits:
        raise ConfigurationError(f"Cannot derive a port from the job id {job_id!r}; set MASTER_PORT instead.")
    return 12000 + int(digits) % 20000
