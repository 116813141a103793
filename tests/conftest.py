"""Shared test setup.

The accelerator leg is chosen with ``--accelerator`` (nox passes it): ``cpu`` runs every test not
marked ``cuda``/``tpu``; ``cuda`` and ``tpu`` run only tests with that marker and skip them, with
the reason, where no such device exists.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # two threads per rank on two cores is ~200x slower

LEGS = ("cpu", "cuda", "tpu")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--accelerator", default="cpu", choices=LEGS, help="which accelerator leg to run")


def _device_present(leg: str) -> tuple[bool, str]:
    if leg == "cuda":
        import torch

        return torch.cuda.is_available(), "no CUDA device on this machine"
    if leg == "tpu":
        from torchloom.core.utils.imports import is_available

        if not is_available("torch_xla"):
            return False, "torch-xla is not installed"
        return bool(os.environ.get("PJRT_DEVICE") or os.environ.get("TPU_NAME")), "no TPU runtime (PJRT_DEVICE unset)"
    return True, ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    leg = config.getoption("--accelerator")
    if leg == "cpu":
        for item in items:
            for marker in ("cuda", "tpu"):
                if item.get_closest_marker(marker) is not None:
                    item.add_marker(pytest.mark.skip(reason=f"needs {marker}: run with --accelerator {marker}"))
        return
    present, why = _device_present(leg)
    selected = [item for item in items if item.get_closest_marker(leg) is not None]
    deselected = [item for item in items if item.get_closest_marker(leg) is None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected
    if not present:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=f"{leg} leg: {why}"))
