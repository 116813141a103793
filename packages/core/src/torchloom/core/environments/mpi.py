"""MPI launchers (``mpirun`` / ``mpiexec`` of Open MPI, MPICH, Intel MPI, MVAPICH2).

Detection and ranks come from the launcher's environment variables, so mpi4py is not needed for
them. Supported variable families, first match wins:

============  ======================  ======================  ============================  ===========================
family        world size              rank                    local rank                    local size
============  ======================  ======================  ============================  ===========================
Open MPI      OMPI_COMM_WORLD_SIZE    OMPI_COMM_WORLD_RANK    OMPI_COMM_WORLD_LOCAL_RANK    OMPI_COMM_WORLD_LOCAL_SIZE
PMI (Hydra)   PMI_SIZE                PMI_RANK                MPI_LOCALRANKID               MPI_LOCALNRANKS
MVAPICH2      MV2_COMM_WORLD_SIZE     MV2_COMM_WORLD_RANK     MV2_COMM_WORLD_LOCAL_RANK     MV2_COMM_WORLD_LOCAL_SIZE
============  ======================  ======================  ============================  ===========================

The node rank is ``rank // local size``: mpirun's default mapping fills one node before the next.
The main address is ``MASTER_ADDR``; without it, rank 0 broadcasts its host name with mpi4py when
that is installed (a collective call: every rank asks at the same point, as the strategy does). The
port is ``MASTER_PORT``; else a port rank 0 found free, broadcast the same way; else 29500.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, ClassVar

from typing_extensions import override

from torchloom.core.environments.environment import ClusterEnvironment, env_int, env_port
from torchloom.core.environments.local import find_free_port
from torchloom.core.errors import ConfigurationError
from torchloom.core.utils.imports import is_available

__all__ = ["MPIEnvironment", "mpi_world_from_env"]


@dataclass(frozen=True)
class _Family:
    name: str
    size: str
    rank: str
    local_rank: str
    local_size: str


_FAMILIES = (
    _Family(
        "Open MPI",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    _Family("PMI", "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    _Family(
        "MVAPICH2",
        "MV2_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_RANK",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_SIZE",
    ),
)


def _family() -> _Family | None:
    return next((family for family in _FAMILIES if family.size in os.environ), None)


def mpi_world_from_env() -> tuple[int, int] | None:
    """``(world size, rank)`` as an MPI launcher exported them, or None outside one (or if unreadable)."""
    family = _family()
    if family is None:
        return None
    try:
        return int(os.environ[family.size]), int(os.environ.get(family.rank, "0"))
    except ValueError:
        return None


class MPIEnvironment(ClusterEnvironment):
    """Processes started by ``mpirun``: one per device."""

    name: ClassVar[str] = "mpi"

    def __init__(self) -> None:
        # mpi4py answers are collective calls: ask once, keep the result
        self._main: tuple[str, int] | None = None  # (address, port) broadcast from rank 0
        self._local: tuple[int, int] | None = None  # (local rank, local size) on this node

    @staticmethod
    @override
    def detect() -> bool:
        # a single MPI process has nobody to coordinate with: Local then starts the workers itself
        world = mpi_world_from_env()
        return world is not None and world[0] > 1

    @property
    @override
    def creates_processes_externally(self) -> bool:
        return True

    @property
    @override
    def main_address(self) -> str:
        if "MASTER_ADDR" in os.environ:
            return os.environ["MASTER_ADDR"]
        return self._broadcast_main()[0]

    @property
    @override
    def main_port(self) -> int:
        if "MASTER_PORT" in os.environ:
            return env_port("MASTER_PORT")
        if "MASTER_ADDR" in os.environ and not is_available("mpi4py"):
            return 29500  # torch.distributed's customary port: every rank picks the same one
        return self._broadcast_main()[1]

    @override
    def world_size(self) -> int:
        return env_int(self._require_family().size)

    @override
    def global_rank(self) -> int:
        return env_int(self._require_family().rank)

    @override
    def local_rank(self) -> int:
        family = self._require_family()
        if family.local_rank in os.environ:
            return env_int(family.local_rank)
        return self._local_position()[0]

    @override
    def node_rank(self) -> int:
        family = self._require_family()
        local_size = env_int(family.local_size) if family.local_size in os.environ else self._local_position()[1]
        return self.global_rank() // max(local_size, 1)

    @override
    def validate(self, num_devices: int, num_nodes: int) -> None:
        family = self._require_family()
        world_size = self.world_size()
        local_size = env_int(family.local_size) if family.local_size in os.environ else None
        fix = (
            f"Start devices x num_nodes processes, devices per node, e.g. "
            f"`mpirun -np {num_devices * num_nodes} --npernode {num_devices}` (Open MPI) or "
            f"`mpiexec -n {num_devices * num_nodes} -ppn {num_devices}` (MPICH / Intel MPI)."
        )
        if world_size != num_devices * num_nodes:
            raise ConfigurationError(
                f"{family.name} started {family.size}={world_size} processes, but devices={num_devices} x "
                f"num_nodes={num_nodes} = {num_devices * num_nodes}. {fix}"
            )
        if local_size is not None and local_size != num_devices:
            raise ConfigurationError(
                f"{family.name} started {family.local_size}={local_size} processes on this node, but "
                f"devices={num_devices}. {fix}"
            )

    def _require_family(self) -> _Family:
        family = _family()
        if family is None:
            raise ConfigurationError(
                "MPIEnvironment found no MPI launcher variables (one of "
                f"{', '.join(f.size for f in _FAMILIES)}); start the script with mpirun / mpiexec."
            )
        return family

    def _world_comm(self, missing: str, hint: str) -> Any:
        if not is_available("mpi4py"):
            raise ConfigurationError(
                f"MPIEnvironment cannot find {missing} from the environment variables. {hint}, "
                "or `pip install mpi4py` so torchloom can ask the other ranks."
            )
        from mpi4py import MPI

        return MPI.COMM_WORLD

    def _local_position(self) -> tuple[int, int]:
        """(local rank, local size) from mpi4py's per-node communicator, for launchers that export neither."""
        if self._local is None:
            family = self._require_family()
            comm = self._world_comm(
                f"the local rank ({family.local_rank} is not set)", f"Use an mpirun that exports {family.local_rank}"
            )
            from mpi4py import MPI

            node = comm.Split_type(MPI.COMM_TYPE_SHARED)
            self._local = (int(node.Get_rank()), int(node.Get_size()))
        return self._local

    def _broadcast_main(self) -> tuple[str, int]:
        if self._main is None:
            comm = self._world_comm(
                "the main address (MASTER_ADDR is not set)",
                "Export it to every rank, e.g. `mpirun -x MASTER_ADDR=<rank-0 host> -x MASTER_PORT=29500 ...`",
            )
            mine = (socket.gethostname(), find_free_port("")) if comm.Get_rank() == 0 else None
            address, port = comm.bcast(mine, root=0)
            self._main = (os.environ.get("MASTER_ADDR", address), int(port))
        return self._main
