"""SLURM: ``srun`` has started one task per device (``#SBATCH --ntasks-per-node=<devices>``).

Variables read: ``SLURM_NTASKS`` (world size), ``SLURM_PROCID`` (global rank), ``SLURM_LOCALID``
(local rank), ``SLURM_NODEID`` (node rank), ``SLURM_STEP_NODELIST`` / ``SLURM_NODELIST`` (its first
host is the main address unless ``MASTER_ADDR`` is set), ``SLURM_JOB_ID`` (the default port, unless
``MASTER_PORT`` is set), and for ``validate``: ``SLURM_NTASKS_PER_NODE``, ``SLURM_NNODES``.

When is a process an srun task that torchloom must not multiply? ``detect`` answers yes only if all hold:

1. ``SLURM_NTASKS`` and ``SLURM_PROCID`` are set;
2. it runs inside an srun job step: ``SLURM_STEP_ID`` is a regular step number. The batch script
   itself, an ``salloc`` shell and Slurm's interactive step have no step id or a reserved one
   (4294967290 and up); there torchloom starts the workers itself;
3. a step of a single task is not an interactive shell: job name ``bash``/``interactive`` (or another
   shell's name), or a pseudo-terminal (``SLURM_PTY_PORT``, from ``srun --pty``). A step of several
   tasks is always SLURM, whatever the job name: srun started several copies that must cooperate;
4. no MPI launcher variable (``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE``, ...) disagrees with
   ``SLURM_NTASKS`` / ``SLURM_PROCID``: ``mpirun`` inside an allocation starts ranks under a step of one
   daemon per node, whose SLURM numbers describe the daemons, not the ranks.
"""

from __future__ import annotations

import os
import signal
from typing import ClassVar

from typing_extensions import override

from torchloom.core.environments.environment import ClusterEnvironment, env_int, env_port, port_from_job_id
from torchloom.core.environments.mpi import mpi_world_from_env
from torchloom.core.errors import ConfigurationError

__all__ = ["SLURMEnvironment", "expand_hostlist"]

_SHELL_JOB_NAMES = frozenset({"bash", "sh", "zsh", "fish", "csh", "tcsh", "ksh", "interactive"})
_FIRST_RESERVED_STEP = 0xFFFFFFF0  # batch (…fe), extern (…fc), interactive (…fa) and other pseudo steps


def _int_or_none(name: str) -> int | None:
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip().isdigit() else None


class SLURMEnvironment(ClusterEnvironment):
    """One srun task per device.

    ``auto_requeue`` and ``requeue_signal`` are kept for the trainer: on that signal (sent by
    ``#SBATCH --signal=USR1@90``) it saves a checkpoint and requeues the job with ``scontrol requeue``.
    """

    name: ClassVar[str] = "slurm"

    def __init__(self, auto_requeue: bool = True, requeue_signal: signal.Signals | None = None) -> None:
        self.auto_requeue = auto_requeue
        if requeue_signal is None and hasattr(signal, "SIGUSR1"):  # there is no SIGUSR1 on Windows
            requeue_signal = signal.SIGUSR1
        self.requeue_signal = requeue_signal

    @staticmethod
    @override
    def detect() -> bool:
        ntasks, procid = _int_or_none("SLURM_NTASKS"), _int_or_none("SLURM_PROCID")
        if ntasks is None or procid is None:
            return False
        step = _int_or_none("SLURM_STEP_ID") if "SLURM_STEP_ID" in os.environ else _int_or_none("SLURM_STEPID")
        if step is None or step >= _FIRST_RESERVED_STEP:
            return False
        step_tasks = _int_or_none("SLURM_STEP_NUM_TASKS") or ntasks
        job_name = os.environ.get("SLURM_JOB_NAME", "").strip().lower()
        if step_tasks == 1 and (job_name in _SHELL_JOB_NAMES or "SLURM_PTY_PORT" in os.environ):
            return False
        mpi = mpi_world_from_env()
        return mpi is None or mpi == (ntasks, procid)

    @property
    def job_id(self) -> str | None:
        """The id ``scontrol requeue`` needs: ``<array job>_<task>`` for array tasks, else ``SLURM_JOB_ID``."""
        array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        if array_job and array_task:
            return f"{array_job}_{array_task}"
        return os.environ.get("SLURM_JOB_ID")

    @property
    @override
    def creates_processes_externally(self) -> bool:
        return True

    @property
    @override
    def main_address(self) -> str:
        if "MASTER_ADDR" in os.environ:
            return os.environ["MASTER_ADDR"]
        for name in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST"):
            if os.environ.get(name):
                return expand_hostlist(os.environ[name])[0]
        raise ConfigurationError("SLURM_NODELIST is not set; export MASTER_ADDR=<host of rank 0> instead.")

    @property
    @override
    def main_port(self) -> int:
        if "MASTER_PORT" in os.environ:
            return env_port("MASTER_PORT")
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id:
            raise ConfigurationError("SLURM_JOB_ID is not set; export MASTER_PORT=<free port> instead.")
        # several concurrent srun steps of one job would collide here: those need MASTER_PORT
        return port_from_job_id(job_id)

    @override
    def world_size(self) -> int:
        return env_int("SLURM_NTASKS")

    @override
    def global_rank(self) -> int:
        return env_int("SLURM_PROCID")

    @override
    def local_rank(self) -> int:
        return env_int("SLURM_LOCALID")

    @override
    def node_rank(self) -> int:
        return env_int("SLURM_NODEID")

    @override
    def validate(self, num_devices: int, num_nodes: int) -> None:
        flags = f"`#SBATCH --nodes={num_nodes}` and `#SBATCH --ntasks-per-node={num_devices}`, then `srun python ...`"
        per_node = _int_or_none("SLURM_NTASKS_PER_NODE")
        if per_node is not None and per_node != num_devices:
            raise ConfigurationError(
                f"SLURM starts SLURM_NTASKS_PER_NODE={per_node} tasks per node, but devices={num_devices}. "
                f"torchloom needs one task per device: request {flags}, or pass devices={per_node}."
            )
        nodes = _int_or_none("SLURM_NNODES")
        if nodes is not None and nodes != num_nodes:
            raise ConfigurationError(
                f"The SLURM job runs on SLURM_NNODES={nodes} nodes, but num_nodes={num_nodes}. "
                f"Request {flags}, or pass num_nodes={nodes}."
            )
        ntasks = self.world_size()
        if ntasks != num_devices * num_nodes:
            raise ConfigurationError(
                f"SLURM started SLURM_NTASKS={ntasks} tasks, but devices={num_devices} x num_nodes={num_nodes} = "
                f"{num_devices * num_nodes}. torchloom needs one task per device: request {flags} "
                f"(not only --ntasks, which may spread tasks unevenly)."
            )


def expand_hostlist(hostlist: str) -> list[str]:
    """Expands Slurm's compressed host list, e.g. ``"node[01-03,07],gpu3"`` -> node01, node02, node03, node07, gpu3.

    Zero padding follows the lower bound (``[08-10]`` -> 08, 09, 10); several bracket groups in one
    name expand as a product (``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2). No ``scontrol`` call.
    """
    hosts: list[str] = []
    for expression in _split_outside_brackets(hostlist):
        hosts.extend(_expand_expression(expression, hostlist))
    if not hosts:
        raise ConfigurationError(f"The SLURM host list {hostlist!r} names no host.")
    return hosts


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char in "[]":
            depth += 1 if char == "[" else -1
            if depth not in (0, 1):
                raise ConfigurationError(f"The SLURM host list {text!r} has unbalanced or nested brackets.")
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth != 0:
        raise ConfigurationError(f"The SLURM host list {text!r} has an unclosed '['.")
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def _expand_expression(expression: str, hostlist: str) -> list[str]:
    opening = expression.find("[")
    if opening < 0:
        return [expression]
    closing = expression.index("]", opening)  # balanced: checked by _split_outside_brackets
    prefix, ranges, rest = expression[:opening], expression[opening + 1 : closing], expression[closing + 1 :]
    tails = _expand_expression(rest, hostlist)
    return [prefix + value + tail for value in _expand_ranges(ranges, hostlist) for tail in tails]


def _expand_ranges(ranges: str, hostlist: str) -> list[str]:
    values: list[str] = []
    for item in ranges.split(","):
        low, dash, high = item.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ConfigurationError(
                f"The SLURM host list {hostlist!r} has the bad range {item!r}; expected forms like '7' or '01-04'."
            )
        if not dash:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ConfigurationError(f"The SLURM host list {hostlist!r} has the descending range {item!r}.")
        values.extend(str(number).zfill(len(low)) for number in range(int(low), int(high) + 1))
    return values
