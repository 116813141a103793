"""XLA devices (TPUs) through torch-xla's PJRT runtime, which owns ranks and rendezvous.

torch_xla is imported only when a method is called. The XLA strategy chooses this environment;
``detect_environment`` never does. The answers are valid inside the processes torch-xla's launcher
started (``torch_xla.launch`` / ``xmp.spawn``).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import ClassVar

from typing_extensions import override

from torchloom.core.environments.environment import ClusterEnvironment
from torchloom.core.errors import TorchloomError
from torchloom.core.utils.imports import is_available

__all__ = ["XLAEnvironment"]


def _runtime() -> ModuleType:
    from torchloom.core.accelerators.xla import import_torch_xla  # here: importing environments must not load torch

    return import_torch_xla("torch_xla.runtime", "XLAEnvironment")


class XLAEnvironment(ClusterEnvironment):
    """Ranks and world size from ``torch_xla.runtime``; the XLA launcher starts the processes."""

    name: ClassVar[str] = "xla"

    @staticmethod
    @override
    def detect() -> bool:
        return bool(os.environ.get("PJRT_DEVICE")) and is_available("torch_xla")

    @property
    @override
    def creates_processes_externally(self) -> bool:
        return False

    @property
    @override
    def main_address(self) -> str:
        raise TorchloomError(
            "XLA processes meet through the XLA runtime (init_method='xla://'), which finds the main host "
            "itself; XLAEnvironment has no main address to give."
        )

    @property
    @override
    def main_port(self) -> int:
        raise TorchloomError(
            "XLA processes meet through the XLA runtime (init_method='xla://'), which picks the port "
            "itself; XLAEnvironment has no main port to give."
        )

    @override
    def world_size(self) -> int:
        return int(_runtime().world_size())

    @override
    def global_rank(self) -> int:
        return int(_runtime().global_ordinal())

    @override
    def local_rank(self) -> int:
        return int(_runtime().local_ordinal())

    @override
    def node_rank(self) -> int:
        return int(_runtime().host_index())
