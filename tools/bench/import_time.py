"""Import time: ``import torch`` against the torchloom packages, each in a fresh interpreter, interleaved."""

from __future__ import annotations

from tools.bench.common import Row, iqr, median, run_python, verdict

__all__ = ["TARGETS", "run_import_time"]

# What each interpreter imports (a real public name, so lazy modules cannot cheat) and the target.
TARGETS: dict[str, tuple[str, float | None]] = {
    "torch": ("import torch", None),
    "torchloom.core": ("from torchloom.core import Connector", None),
    "torchloom.fabric": ("from torchloom.fabric import Fabric", 1.15),
    "torchloom.trainer": ("from torchloom.trainer import Trainer", 1.25),
}

_PROBE = "import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"


def measure_once(statement: str) -> float:
    return float(run_python(["-c", _PROBE.format(statement=statement)], timeout=120).strip().splitlines()[-1])


def run_import_time(repetitions: int) -> list[Row]:
    """Medians of ``repetitions`` fresh-interpreter imports per target, taken in turn (torch, core, fabric, ...)."""
    seconds: dict[str, list[float]] = {name: [] for name in TARGETS}
    for _ in range(repetitions):
        for name, (statement, _target) in TARGETS.items():
            seconds[name].append(measure_once(statement))
    torch_median = median(seconds["torch"])
    rows = []
    for name, (_statement, target) in TARGETS.items():
        ratio = median(seconds[name]) / torch_median
        rows.append(
            Row("import", name, median(seconds[name]), iqr(seconds[name]), ratio, target, verdict(ratio, target))
        )
    return rows
