"""IBM LSF with ``jsrun`` (CORAL systems such as Summit): jsrun has started one task per device.

Variables read: ``LSB_JOBID``, ``LSB_DJOB_RANKFILE`` (a file with one host name per line, one line
per slot; its first line is the launch node, which runs no tasks), ``JSM_NAMESPACE_SIZE`` (world
size), ``JSM_NAMESPACE_RANK`` (global rank), ``JSM_NAMESPACE_LOCAL_RANK`` (local rank).
The compute hosts, in rankfile order without repeats, give the main address (the first one, unless
``MASTER_ADDR`` is set) and the node rank (this host's position).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import ClassVar

from typing_extensions import override

from torchloom.core.environments.environment import ClusterEnvironment, env_int, env_port, port_from_job_id
from torchloom.core.errors import ConfigurationError

__all__ = ["LSFEnvironment", "read_rankfile_hosts"]

_REQUIRED = ("LSB_JOBID", "LSB_DJOB_RANKFILE", "JSM_NAMESPACE_LOCAL_RANK", "JSM_NAMESPACE_SIZE", "JSM_NAMESPACE_RANK")


def read_rankfile_hosts(path: str | os.PathLike[str]) -> list[str]:
    """The compute hosts of an LSF rankfile: the launch host (first line) skipped, repeats dropped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigurationError(f"Cannot read the LSF rankfile LSB_DJOB_RANKFILE={str(path)!r}: {exc}") from exc
    names = [line.strip() for line in lines if line.strip()]
    hosts = list(dict.fromkeys(names[1:]))
    if not hosts:
        raise ConfigurationError(
            f"The LSF rankfile {str(path)!r} lists no compute host after the launch host (lines: {names!r})."
        )
    return hosts


class LSFEnvironment(ClusterEnvironment):
    """One jsrun task per device."""

    name: ClassVar[str] = "lsf"

    def __init__(self) -> None:
        self._hosts: list[str] | None = None

    @staticmethod
    @override
    def detect() -> bool:
        return all(name in os.environ for name in _REQUIRED)

    @property
    @override
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def hosts(self) -> list[str]:
        """The compute hosts of the job, in rankfile order (read once)."""
        if self._hosts is None:
            if "LSB_DJOB_RANKFILE" not in os.environ:
                raise ConfigurationError("LSB_DJOB_RANKFILE is not set; start the script with jsrun inside bsub.")
            self._hosts = read_rankfile_hosts(os.environ["LSB_DJOB_RANKFILE"])
        return self._hosts

    @property
    @override
    def main_address(self) -> str:
        return os.environ.get("MASTER_ADDR") or self.hosts[0]

    @property
    @override
    def main_port(self) -> int:
        if "MASTER_PORT" in os.environ:
            return env_port("MASTER_PORT")
        return port_from_job_id(os.environ.get("LSB_JOBID", ""))

    @override
    def world_size(self) -> int:
        return env_int("JSM_NAMESPACE_SIZE")

    @override
    def global_rank(self) -> int:
        return env_int("JSM_NAMESPACE_RANK")

    @override
    def local_rank(self) -> int:
        return env_int("JSM_NAMESPACE_LOCAL_RANK")

    @override
    def node_rank(self) -> int:
        full = socket.gethostname()
        for index, host in enumerate(self.hosts):
            # the rankfile may list short or fully qualified names: compare the short ones too
            if host == full or host.split(".")[0] == full.split(".")[0]:
                return index
        raise ConfigurationError(f"This host {full!r} is not among the LSF rankfile's compute hosts {self.hosts!r}.")

    @override
    def validate(self, num_devices: int, num_nodes: int) -> None:
        fix = f"Launch one task per device, e.g. `jsrun --nrs {num_nodes} --tasks_per_rs {num_devices} --gpu_per_rs {num_devices} python ...`"
        nodes = len(self.hosts)
        if nodes != num_nodes:
            raise ConfigurationError(
                f"The LSF job has {nodes} compute hosts ({', '.join(self.hosts)}), but num_nodes={num_nodes}. "
                f"Pass num_nodes={nodes}, or request {num_nodes} nodes (`bsub -nnodes {num_nodes}`)."
            )
        world_size = self.world_size()
        if world_size != num_devices * num_nodes:
            raise ConfigurationError(
                f"jsrun started JSM_NAMESPACE_SIZE={world_size} tasks, but devices={num_devices} x "
                f"num_nodes={num_nodes} = {num_devices * num_nodes}. {fix}."
            )
