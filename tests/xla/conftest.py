"""Starts the XLA runtime before any test runs a backward pass.

torch's autograd engine sizes its per-device queues once, at the first backward of the process; a
backward on the CPU before the XLA runtime has started leaves no queue for ``xla:0`` (an internal assert
in autograd's engine.cpp at the first XLA backward). The tests compare XLA runs with CPU runs in one process.
"""

from __future__ import annotations

import os

import pytest

from torchloom.core.utils.imports import is_available


@pytest.fixture(autouse=True, scope="session")
def xla_runtime_started() -> None:
    if os.environ.get("PJRT_DEVICE") and is_available("torch_xla"):
        import torch_xla

        torch_xla.device()
