"""Which cluster environment is this process in? The first ``detect()`` that says yes, in this order:

1. ``TorchElasticEnvironment`` (torchrun): first, because torchrun may run inside any scheduler's job
   (``srun torchrun ...`` in an sbatch script, torchrun in a Kubeflow pod) and then its own variables
   describe the workers, while the scheduler's describe the torchrun agents.
2. ``SLURMEnvironment``: only inside an srun step that is not an interactive shell (see its module);
   an ``salloc`` / ``srun --pty bash`` session or a plain batch script falls through to Local.
3. ``LSFEnvironment`` (jsrun): before MPI, because jsrun's Spectrum MPI exports Open MPI's
   variables too, and LSF knows the hosts.
4. ``MPIEnvironment`` (mpirun with more than one process).
5. ``KubeflowEnvironment``: only with all of its variables, no torchrun, and not in a worker that
   torchloom itself started (those carry ``LOCAL_RANK`` and are Local).
6. ``LocalEnvironment``: otherwise; torchloom starts the workers itself.

``XLAEnvironment`` is never chosen here: the XLA strategy picks it.
"""

from __future__ import annotations

from torchloom.core.environments.environment import ClusterEnvironment
from torchloom.core.environments.kubeflow import KubeflowEnvironment
from torchloom.core.environments.local import LocalEnvironment
from torchloom.core.environments.lsf import LSFEnvironment
from torchloom.core.environments.mpi import MPIEnvironment
from torchloom.core.environments.slurm import SLURMEnvironment
from torchloom.core.environments.torchelastic import TorchElasticEnvironment

__all__ = ["DETECTION_ORDER", "detect_environment"]

DETECTION_ORDER: tuple[type[ClusterEnvironment], ...] = (
    TorchElasticEnvironment,
    SLURMEnvironment,
    LSFEnvironment,
    MPIEnvironment,
    KubeflowEnvironment,
)


def detect_environment() -> ClusterEnvironment:
    """A new instance of the first environment in ``DETECTION_ORDER`` that detects itself, else Local."""
    for environment in DETECTION_ORDER:
        if environment.detect():
            return environment()
    return LocalEnvironment()
