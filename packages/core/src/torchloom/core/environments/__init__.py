"""Cluster environments: where this process sits in the job, read from the launcher or scheduler.

Importing this package loads only the standard library (no torch, no mpi4py, no torch_xla).
``detect_environment()`` picks one; its module documents the order.
"""

from torchloom.core.environments.detect import DETECTION_ORDER, detect_environment
from torchloom.core.environments.environment import ClusterEnvironment
from torchloom.core.environments.kubeflow import KubeflowEnvironment
from torchloom.core.environments.local import LocalEnvironment, find_free_port
from torchloom.core.environments.lsf import LSFEnvironment
from torchloom.core.environments.mpi import MPIEnvironment
from torchloom.core.environments.slurm import SLURMEnvironment, expand_hostlist
from torchloom.core.environments.torchelastic import TorchElasticEnvironment
from torchloom.core.environments.xla import XLAEnvironment

__all__ = [
    "DETECTION_ORDER",
    "ClusterEnvironment",
    "KubeflowEnvironment",
    "LSFEnvironment",
    "LocalEnvironment",
    "MPIEnvironment",
    "SLURMEnvironment",
    "TorchElasticEnvironment",
    "XLAEnvironment",
    "detect_environment",
    "expand_hostlist",
    "find_free_port",
]
