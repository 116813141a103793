"""Kubeflow PyTorchJob: one pod per node; the training operator describes the *pods*, not the processes.

The operator exports ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE`` and ``RANK`` (and Kubernetes puts
``KUBERNETES_PORT`` into every pod). ``RANK`` is the pod's index, i.e. the node rank. ``WORLD_SIZE`` is
the number of pods, except that newer operators multiply it by ``nprocPerNode`` and also export
``PET_NNODES`` (pods) and ``PET_NODE_RANK`` (pod index); those win where they are plain integers.

torchloom starts ``devices`` processes in each pod, so the global world size is pods x devices and the
global rank is pod index x devices + local rank. The strategy sets both (``set_world_size`` /
``set_global_rank``); before that they are computed from the ``devices`` that ``validate`` was given
(one process per pod until then). Reading ``WORLD_SIZE`` as the process count is the misdetection
this class avoids.

Workers that torchloom starts inside a pod carry ``LOCAL_RANK``; ``detect`` leaves them to
``LocalEnvironment``, which reads what the launcher exported (``NODE_RANK``, ``MASTER_*``).
"""

from __future__ import annotations

import os
from typing import ClassVar

from typing_extensions import override

from torchloom.core.environments.environment import ClusterEnvironment, env_int, env_port
from torchloom.core.errors import ConfigurationError

__all__ = ["KubeflowEnvironment"]

_REQUIRED = ("KUBERNETES_PORT", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


def _plain_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw.isdigit() else None  # PET_NNODES may be a range like "1:4" in elastic jobs


class KubeflowEnvironment(ClusterEnvironment):
    """A pod of a Kubeflow PyTorchJob, running ``devices`` processes that torchloom starts."""

    name: ClassVar[str] = "kubeflow"

    def __init__(self) -> None:
        self._world_size: int | None = None
        self._global_rank: int | None = None
        self._devices_per_pod = 1  # learned in validate()

    @staticmethod
    @override
    def detect() -> bool:
        if not all(os.environ.get(name) for name in _REQUIRED):
            return False
        # torchrun inside the pod owns the ranks; a worker we started is described by LocalEnvironment
        return "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ

    @property
    @override
    def creates_processes_externally(self) -> bool:
        return "LOCAL_RANK" in os.environ

    @property
    @override
    def main_address(self) -> str:
        address = os.environ.get("MASTER_ADDR")
        if not address:
            raise ConfigurationError("MASTER_ADDR is not set; the Kubeflow training operator normally exports it.")
        return address

    @property
    @override
    def main_port(self) -> int:
        return env_port("MASTER_PORT")

    def num_pods(self) -> int:
        """How many pods (nodes) the PyTorchJob runs."""
        pods = _plain_int("PET_NNODES")
        if pods is not None:
            return pods
        nproc = _plain_int("PET_NPROC_PER_NODE")  # "auto" or unset means one process per pod
        return env_int("WORLD_SIZE") // (nproc or 1)

    @override
    def world_size(self) -> int:
        return self._world_size if self._world_size is not None else self.num_pods() * self._devices_per_pod

    @override
    def set_world_size(self, size: int) -> None:
        self._world_size = size

    @override
    def global_rank(self) -> int:
        if self._global_rank is not None:
            return self._global_rank
        return self.node_rank() * self._devices_per_pod + self.local_rank()

    @override
    def set_global_rank(self, rank: int) -> None:
        self._global_rank = rank

    @override
    def local_rank(self) -> int:
        return env_int("LOCAL_RANK", 0)

    @override
    def node_rank(self) -> int:
        pod_index = _plain_int("PET_NODE_RANK")
        return pod_index if pod_index is not None else env_int("RANK")

    @override
    def validate(self, num_devices: int, num_nodes: int) -> None:
        self._devices_per_pod = num_devices
        if self.creates_processes_externally:
            return  # a worker we started: its parent checked, and WORLD_SIZE may have been re-exported since
        pods = self.num_pods()
        if pods != num_nodes:
            raise ConfigurationError(
                f"The PyTorchJob runs {pods} pods (Master + Worker replicas), but num_nodes={num_nodes}. "
                f"Pass num_nodes={pods} (torchloom starts devices={num_devices} processes in each pod), "
                f"or change the job's replicas to {num_nodes}."
            )
        if not 0 <= self.node_rank() < pods:
            raise ConfigurationError(
                f"The pod index {self.node_rank()} (PET_NODE_RANK, else RANK) is out of range for {pods} pods."
            )
