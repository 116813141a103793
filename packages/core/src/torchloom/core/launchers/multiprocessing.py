"""Starting the workers with ``torch.multiprocessing`` (spawn or fork); notebooks use fork.

Each worker sets its rank on its copy of the strategy, calls ``strategy.setup_environment()``
(process group included) and runs the function; local rank 0 sends its result back (tensors
moved to the CPU). ``torch.multiprocessing`` supervises: when a worker raises or dies, the others
are terminated and ``launch`` raises ``WorkerFailedError`` naming the rank, with its traceback.
"""

from __future__ import annotations

import os
import pickle
import signal
from collections.abc import Callable
from multiprocessing.queues import SimpleQueue
from typing import TYPE_CHECKING, Any

import torch
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.multiprocessing.spawn import (
    ProcessContext,
    ProcessExitedException,
    ProcessRaisedException,
    start_processes,
)
from typing_extensions import override

from torchloom.core.errors import ConfigurationError, WorkerFailedError, choices
from torchloom.core.launchers.launcher import Launcher
from torchloom.core.preemption import forwarding_signals
from torchloom.core.utils.collections import apply_to_collection

if TYPE_CHECKING:
    from torchloom.core.strategies.parallel import ParallelStrategy

__all__ = ["MultiprocessingLauncher"]

_START_METHODS = ("spawn", "fork", "notebook")  # "notebook" is fork with a CUDA safety check
_POLL_SECONDS = 0.1
# once a worker failed, the others get this long to end on their own (the culprit to finish exiting with its own
# status, its peers to fail out of their collectives) before SIGTERM, and as long again before SIGKILL
_GRACE_SECONDS = 3.0


class MultiprocessingLauncher(Launcher):
    """``strategy.num_processes`` workers on this node via ``torch.multiprocessing.start_processes``.

    ``"spawn"`` needs a picklable function and arguments (define the function at module level and
    guard the script with ``if __name__ == "__main__":``). ``"fork"``/``"notebook"`` copy this
    process, so they work in notebooks, but not once CUDA is initialised here.
    """

    def __init__(self, strategy: ParallelStrategy, start_method: str = "spawn") -> None:
        if start_method not in _START_METHODS:
            raise ConfigurationError(f"start_method={start_method!r} is not valid. Valid: {choices(_START_METHODS)}.")
        method = "fork" if start_method == "notebook" else start_method
        if method not in mp.get_all_start_methods():
            raise ConfigurationError(
                f"start_method={start_method!r} needs 'fork', which this platform does not have "
                f"(available: {choices(mp.get_all_start_methods())}). Use strategy='ddp_spawn' instead."
            )
        self._strategy = strategy
        self._start_method = start_method
        self._method = method

    @property
    def start_method(self) -> str:
        return self._start_method

    @property
    @override
    def is_interactive_compatible(self) -> bool:
        return self._method == "fork"

    @override
    def launch(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Runs ``function(*args, **kwargs)`` in every worker; returns local rank 0's result."""
        if self._method == "fork":
            _check_cuda_not_initialized(self._start_method)
        elif getattr(mp.current_process(), "_inheriting", False):
            raise ConfigurationError(
                "strategy 'ddp_spawn' started a worker that re-ran your script up to launch() again: the "
                'script\'s entry code must sit under `if __name__ == "__main__":`, as spawn imports the main module.'
            )
        strategy = self._strategy
        environment = strategy.cluster_environment
        environment.validate(strategy.num_processes, strategy.num_nodes)
        environment.main_port  # noqa: B018 - picks (and exports) the port here, so every worker agrees
        try:
            return self._start_and_join(function, args, kwargs)
        finally:
            environment.teardown()  # forget this launch's port; the next launch picks a fresh one

    def _start_and_join(self, function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        strategy = self._strategy
        single_thread = strategy.num_processes > 1 and "OMP_NUM_THREADS" not in os.environ
        results: SimpleQueue[Any] = mp.get_context(self._method).SimpleQueue()
        try:
            context = start_processes(  # type: ignore[no-untyped-call]
                _worker,
                args=(strategy, function, args, kwargs, results, single_thread, self._method == "spawn"),
                nprocs=strategy.num_processes,
                join=False,
                start_method=self._method,
            )
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            if self._method != "spawn" or "pickle" not in str(error).lower():
                raise
            raise ConfigurationError(
                f"strategy 'ddp_spawn' must pickle the function and its arguments, which failed: {error}. "
                "Define the function at module level, or use 'ddp_fork' / 'ddp_notebook' which need no pickling."
            ) from error
        try:
            # a SIGTERM to this process goes to the workers, which can save and exit (core/preemption.py)
            with forwarding_signals(lambda: [p.pid for p in context.processes if p.is_alive()]):
                return _join(context, results)
        except (ProcessRaisedException, ProcessExitedException) as error:
            raise _worker_failed(context, error, strategy) from None
        finally:
            _remove_error_files(context)


def _worker(
    local_rank: int,
    strategy: ParallelStrategy,
    function: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    results: SimpleQueue[Any],
    single_thread: bool,
    spawned: bool,
) -> None:
    if single_thread:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    if spawned:
        # Pickling for spawn put the arguments' tensors in memory shared by all workers; DDP needs
        # one independent replica per worker.
        args, kwargs = _unshare((args, kwargs))
    strategy.local_rank = local_rank  # global rank = node_rank * num_processes + local_rank
    strategy.setup_environment()
    result = function(*args, **kwargs)
    if local_rank == 0:
        # plain pickle copies tensor data; torch's shared-memory pickling would need this process alive
        results.put(pickle.dumps(apply_to_collection(result, Tensor, lambda t: t.detach().cpu())))


def _unshare(data: Any) -> Any:
    def unshare_module(module: nn.Module) -> nn.Module:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_shared():  # type: ignore[no-untyped-call]
                tensor.data = tensor.data.clone()
        return module

    data = apply_to_collection(data, nn.Module, unshare_module)
    return apply_to_collection(data, Tensor, lambda t: t.clone() if t.is_shared() else t)


def _join(context: ProcessContext, results: SimpleQueue[Any]) -> Any:
    # Read the result while waiting: a large one fills the pipe and blocks its worker until read.
    result: Any = None
    while True:
        done = context.join(timeout=_POLL_SECONDS, grace_period=_GRACE_SECONDS)
        if not results.empty():
            result = pickle.loads(results.get())
        if done:
            return result


def _check_cuda_not_initialized(start_method: str) -> None:
    bad_fork = getattr(torch.cuda, "_is_in_bad_fork", None)
    initialized = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    if initialized or (bad_fork is not None and bad_fork()):
        raise ConfigurationError(
            f"start_method={start_method!r} forks this process, but CUDA is already initialised in it, and a "
            "forked process cannot use CUDA then. Use strategy='ddp_spawn', or restart (the notebook kernel) "
            "and do not touch CUDA (tensors on the GPU, torch.cuda calls) before launching."
        )


def _root_cause_order(context: ProcessContext, index: int) -> tuple[int, float, int]:
    """The worker that failed first sorts first (see the same rule in subprocess_script.py)."""
    exitcode = context.processes[index].exitcode
    path = context.error_files[index]
    has_file = os.path.isfile(path) and os.path.getsize(path) > 0
    if exitcode is not None and exitcode < 0 and exitcode != -signal.SIGTERM:
        category = 0
    elif exitcode and exitcode > 0 and not has_file:
        category = 1
    elif has_file:
        category = 2
    else:
        category = 3
    return category, os.path.getmtime(path) if has_file else 0.0, index


def _status(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            return f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _worker_failed(context: ProcessContext, error: Exception, strategy: ParallelStrategy) -> WorkerFailedError:
    failed = [i for i, p in enumerate(context.processes) if p.exitcode != 0]
    if not failed:
        return WorkerFailedError(str(error))
    ordered = sorted(failed, key=lambda i: _root_cause_order(context, i))
    index = ordered[0]
    process = context.processes[index]
    rank = strategy.node_rank * strategy.num_processes + index
    path = context.error_files[index]
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as file:
            details = str(pickle.load(file))
    else:
        details = "It left no traceback; its own output above shows what happened."
    message = (
        f"Worker with global rank {rank} (local rank {index}, pid {process.pid}) {_status(process.exitcode)}.\n"
        f"{details.rstrip()}"
    )
    others = [i for i in range(len(context.processes)) if i != index]
    if others:
        stopped = "".join(
            f"\n  rank {strategy.node_rank * strategy.num_processes + i} (pid {context.processes[i].pid}) "
            f"{_status(context.processes[i].exitcode)}"
            for i in others
        )
        message += f"\nThe other workers were stopped:{stopped}"
    return WorkerFailedError(message, rank=rank, exitcode=process.exitcode)


def _remove_error_files(context: ProcessContext) -> None:
    for path in context.error_files:
        if path and os.path.isfile(path):
            os.unlink(path)
