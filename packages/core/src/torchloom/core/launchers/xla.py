"""XLALauncher: the worker processes of the XLA strategy, started by torch-xla's own launcher (``torch_xla.launch``)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor
from typing_extensions import override

from torchloom.core.accelerators.xla import import_torch_xla
from torchloom.core.errors import WorkerFailedError
from torchloom.core.launchers.launcher import Launcher
from torchloom.core.utils.collections import apply_to_collection

if TYPE_CHECKING:
    from torchloom.core.strategies.xla import XLAStrategy

__all__ = ["XLALauncher"]


class XLALauncher(Launcher):
    """Runs a function in one worker per XLA device with ``torch_xla.launch`` (PJRT: the runtime sets the ranks).

    Each worker runs the strategy's ``setup_environment`` and then the function; rank 0's result comes back
    (tensors on the CPU) through a managed queue. A worker that raises ends the launch, and ``launch`` raises
    ``WorkerFailedError`` with its error. torch-xla decides how many workers a host runs (one per TPU chip; on
    XLA's CPU backend one process with a thread per ``CPU_NUM_DEVICES`` device).
    """

    def __init__(self, strategy: XLAStrategy, start_method: str = "spawn") -> None:
        self._strategy = strategy
        self._start_method = start_method

    @property
    @override
    def is_interactive_compatible(self) -> bool:
        return self._start_method == "fork"

    @override
    def launch(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        torch_xla = import_torch_xla("torch_xla", "XLALauncher")
        # torch_xla.launch returns nothing and pickles its arguments into a process pool: a managed queue
        # (a picklable proxy) carries rank 0's result back
        with multiprocessing.get_context(self._start_method).Manager() as manager:
            results = manager.Queue()
            try:
                torch_xla.launch(
                    _run_worker, args=(self._strategy, function, args, kwargs, results), start_method=self._start_method
                )
            except Exception as error:
                raise WorkerFailedError(f"An XLA worker failed: {type(error).__name__}: {error}") from error
            if results.empty():
                raise WorkerFailedError("The XLA workers finished, but rank 0 sent back no result.", rank=0)
            return results.get()


def _run_worker(
    index: int,
    strategy: XLAStrategy,
    function: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    results: Any,
) -> None:
    """One worker: ``index`` is torch-xla's local ordinal; the runtime knows the global rank."""
    strategy.local_rank = index
    strategy.setup_environment()
    result = function(*args, **kwargs)
    if strategy.global_rank == 0:
        results.put(apply_to_collection(result, Tensor, lambda tensor: tensor.detach().cpu()))
