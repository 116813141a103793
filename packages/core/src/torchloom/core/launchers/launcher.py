"""The Launcher contract: how the worker processes of a job come to exist."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

__all__ = ["Launcher"]


class Launcher(ABC):
    """Starts the workers and runs ``function`` in each.

    Supervision is delegated to an existing engine (``torch.distributed.elastic``,
    ``torch.multiprocessing``, torch-xla). Whatever the engine, a worker that dies takes the others
    down and ``launch`` raises ``WorkerFailedError`` naming its rank.
    """

    #: True when ``launch`` starts the workers by running the user's script again (so it needs no
    #: function, and code after ``launch`` runs in the workers only); False when it runs a function.
    reruns_script: bool = False

    @property
    @abstractmethod
    def is_interactive_compatible(self) -> bool:
        """Whether it works inside a notebook or REPL (only fork-based launchers do)."""

    @abstractmethod
    def launch(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Runs ``function(*args, **kwargs)`` in every worker and returns rank 0's result."""
