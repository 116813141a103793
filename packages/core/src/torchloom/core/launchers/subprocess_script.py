"""Re-running the user's script as N workers under ``torch.distributed.elastic`` (what torchrun does).

The process that calls ``launch`` becomes the elastic *agent*: it starts ``num_processes`` copies of
the command it was started with (``python script.py args`` or ``python -m module args``), supervises
them, and **exits the process** with code 0 once every worker has succeeded, like torchrun. Code
after ``launch`` therefore runs in the workers only, and code before it runs in the agent and in
every worker. When a worker fails, elastic stops the others (SIGTERM, then SIGKILL after
``termination_timeout`` seconds) and ``launch`` raises ``WorkerFailedError`` with the failed rank,
its exit code or signal, and its traceback. With ``max_restarts=N`` elastic instead starts every worker
again, up to N times (each new attempt sees ``TORCHELASTIC_RESTART_COUNT`` 1, 2, ...), and ``launch``
raises only when the restarts are used up.

Inside a worker (or any process whose launcher already exists: torchrun, srun, a user's own
``LOCAL_RANK`` launch) ``launch`` runs ``worker_setup`` (the strategy's ``setup_environment``: device
and process group), then calls the function and returns its result, as the other launchers do.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from torchloom.core.environments.environment import ClusterEnvironment
from torchloom.core.errors import ConfigurationError, WorkerFailedError
from torchloom.core.launchers.launcher import Launcher
from torchloom.core.rendezvous import host_agent_store

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

__all__ = ["SIGNALS_TO_FORWARD", "SubprocessScriptLauncher", "script_command", "signal_exit", "worker_failed_error"]

# torch's default set plus SIGUSR1 (SLURM's usual warning before a deadline): the agent passes them on to the
# workers instead of dying of SIGUSR1's default action and leaving them running
SIGNALS_TO_FORWARD = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
_RUN_ID = "torchloom"  # agents on different nodes must agree on it; the store port already isolates jobs


def script_command() -> list[str]:
    """The arguments that re-run this program: ``[script, *args]`` or ``["-m", module, *args]``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return ["-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]]
    script = getattr(main, "__file__", None)
    if not script:
        raise ConfigurationError(
            "strategy 'ddp' (start_method='popen') starts its workers by running your script again, but this "
            "process has no script (interactive session, notebook or `python -c`). Use strategy='ddp_notebook' "
            "(or 'ddp_fork') here, or 'ddp_spawn'."
        )
    return [os.path.abspath(script), *sys.argv[1:]]


class SubprocessScriptLauncher(Launcher):
    """``num_processes`` workers per node through ``torch.distributed.launcher.api.elastic_launch``.

    With ``num_nodes > 1`` run the same command on every node with ``NODE_RANK`` 0..N-1 and the same
    ``MASTER_ADDR`` / ``MASTER_PORT``: node 0's agent hosts the rendezvous store, the others join it.
    """

    reruns_script = True

    def __init__(
        self,
        cluster_environment: ClusterEnvironment,
        num_processes: int,
        num_nodes: int = 1,
        *,
        timeout: datetime.timedelta = datetime.timedelta(minutes=30),
        termination_timeout: int = 10,
        monitor_interval: float = 0.1,
        worker_setup: Callable[[], None] | None = None,
        max_restarts: int = 0,
    ) -> None:
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ConfigurationError(
                f"max_restarts={max_restarts!r} is not valid. Valid: an int >= 0 such as 0 (no restart) or 3."
            )
        if num_processes < 1 or num_nodes < 1:
            raise ConfigurationError(
                f"num_processes={num_processes} and num_nodes={num_nodes} must both be >= 1 to launch workers."
            )
        self.cluster_environment = cluster_environment
        self.num_processes = num_processes
        self.num_nodes = num_nodes
        self.timeout = timeout
        self.termination_timeout = termination_timeout
        self.monitor_interval = monitor_interval
        self.worker_setup = worker_setup
        self.max_restarts = max_restarts

    @property
    @override
    def is_interactive_compatible(self) -> bool:
        return False

    @property
    def in_worker(self) -> bool:
        """Whether this process is a worker already (ours, torchrun's, srun's, ...)."""
        return (
            "TORCHELASTIC_RUN_ID" in os.environ
            or "LOCAL_RANK" in os.environ
            or self.cluster_environment.creates_processes_externally
        )

    @override
    def launch(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """In a worker: ``function(*args, **kwargs)``. Otherwise: runs the workers, then exits with 0."""
        if self.in_worker:
            return _call_recording_errors(self._in_worker, function, *args, **kwargs)
        self.cluster_environment.validate(self.num_processes, self.num_nodes)
        self._run_agent(script_command())
        sys.exit(0)

    def _in_worker(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.worker_setup is not None:
            self.worker_setup()
        return function(*args, **kwargs)

    def _run_agent(self, command: list[str]) -> None:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        if self.num_processes > 1 and "OMP_NUM_THREADS" not in os.environ:
            # as torchrun: N processes each spinning one OpenMP thread per core oversubscribe the CPU
            os.environ["OMP_NUM_THREADS"] = "1"
        environment = self.cluster_environment
        address = environment.main_address
        host = f"[{address}]" if ":" in address else address
        if environment.node_rank() == 0:  # on a loopback address the agent's store then listens there only
            host_agent_store(address, environment.main_port, self.timeout)
        config = LaunchConfig(
            min_nodes=self.num_nodes,
            max_nodes=self.num_nodes,
            nproc_per_node=self.num_processes,
            run_id=_RUN_ID,
            rdzv_backend="static",  # node_rank fixes each node's place; node 0's agent hosts the store
            rdzv_endpoint=f"{host}:{environment.main_port}",
            rdzv_configs={"rank": environment.node_rank(), "timeout": int(self.timeout.total_seconds())},
            max_restarts=self.max_restarts,
            monitor_interval=self.monitor_interval,
            **_newer_launch_options(
                LaunchConfig, shutdown_timeout=self.termination_timeout, signals_to_handle=SIGNALS_TO_FORWARD
            ),
        )
        try:
            elastic_launch(config, sys.executable)(*command)
        except ChildFailedError as error:
            raise worker_failed_error(error) from None
        except SignalException as signalled:
            sys.exit(signal_exit(signalled.sigval, self.termination_timeout))


def _newer_launch_options(config_class: type, **options: Any) -> dict[str, Any]:
    """The ``options`` this torch's ``LaunchConfig`` has: torch 2.9's lacks ``shutdown_timeout`` (its agent waits
    30 s) and ``signals_to_handle`` (it passes SIGTERM, SIGINT, SIGHUP and SIGQUIT on, not SIGUSR1)."""
    known = {field.name for field in dataclasses.fields(config_class)}
    return {name: value for name, value in options.items() if name in known}


def signal_exit(received: int, grace_s: float | None) -> int:
    """Says what the agent did with a signal it received (passed it on; workers had ``grace_s`` to save and stop,
    e.g. at a preemption) and returns the shell's status for a death by it, 128 + its number."""
    name = signal.Signals(received).name
    print(
        f"torchloom: the launcher received {name} and passed it on to the workers, which had {grace_s} s to save and "
        "stop before SIGKILL (a Trainer saves a checkpoint on SIGTERM at its next step).",
        file=sys.stderr,
    )
    return 128 + int(received)


def _call_recording_errors(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Calls ``function``; an exception is also written to the error file elastic gave this worker."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return function(*args, **kwargs)
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    handler = get_error_handler()
    handler.initialize()  # also dumps Python tracebacks on fatal signals (segfaults)
    try:
        return function(*args, **kwargs)
    except Exception as error:
        handler.record_exception(error)
        raise


def _root_cause_order(item: tuple[int, ProcessFailure]) -> tuple[int, float, int]:
    """Sorts the worker that failed first to the front.

    Elastic stamps failures in whole seconds, too coarse to tell the culprit from a peer that
    failed a moment later because of it. So: a death by a signal other than the agent's own SIGTERM
    comes first, then a non-zero exit that left no error file, then recorded exceptions by the
    error file's precise write time, then the workers the agent terminated.
    """
    rank, failure = item
    has_file = os.path.isfile(failure.error_file)
    if failure.exitcode < 0 and failure.signal_name() != "SIGTERM":
        category = 0
    elif failure.exitcode > 0 and not has_file:
        category = 1
    elif has_file:
        category = 2
    else:
        category = 3
    when = os.path.getmtime(failure.error_file) if has_file else float(failure.timestamp)
    return category, when, rank


def _describe(failure: ProcessFailure) -> str:
    if failure.exitcode < 0:
        return f"was killed by signal {failure.signal_name()}"
    return f"exited with code {failure.exitcode}"


def worker_failed_error(error: ChildFailedError) -> WorkerFailedError:
    """The failure of a job of elastic workers as one error: the worker that failed first, with its traceback, then
    the others (torch's own summary orders ties in whole seconds by rank, which can name a victim as the cause)."""
    ordered = sorted(error.failures.items(), key=_root_cause_order)
    rank, failure = ordered[0]
    details = failure.message
    if isinstance(details, dict):
        extra = details.get("extraInfo", {})
        details = extra.get("py_callstack") or details.get("message", "")
    if not isinstance(details, str) or not os.path.isfile(failure.error_file):
        details = "It left no traceback; its own output above shows what happened."
    others = "".join(f"\n  rank {r} (pid {f.pid}) {_describe(f)}" for r, f in ordered[1:])
    message = (
        f"Worker with global rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) "
        f"{_describe(failure)}.\n{details.rstrip()}"
    )
    if others:
        message += f"\nThe other workers were stopped:{others}"
    return WorkerFailedError(message, rank=rank, exitcode=failure.exitcode)
