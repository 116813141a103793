"""Shared pieces of the benchmarks: the child environment, subprocess runs, statistics, targets and the table."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["ROOT", "Row", "bench_env", "format_table", "iqr", "median", "run_python", "verdict"]

ROOT = Path(__file__).resolve().parents[2]


def bench_env() -> dict[str, str]:
    """One environment for every child: one thread, fixed malloc thresholds (no trim/mmap drift between runs)."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MALLOC_MMAP_THRESHOLD_=str(1 << 30),
        MALLOC_TRIM_THRESHOLD_=str(1 << 30),
        PYTHONHASHSEED="0",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
    )
    return env


def run_python(args: Sequence[str], timeout: float) -> str:
    """Run ``python <args>`` from the repository root with the bench environment; return its stdout."""
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=bench_env(), capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {list(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def iqr(values: Sequence[float]) -> float:
    """Interquartile range: the spread that one slow outlier does not blow up."""
    if len(values) < 2:
        return 0.0
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return quartiles[2] - quartiles[0]


def verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return "info"
    return "PASS" if ratio <= target else "FAIL"


@dataclass
class Row:
    """One line of the table and of the JSON: a measurement, its ratio to plain PyTorch and the verdict."""

    kind: str  # "step" or "import"
    name: str
    median: float  # seconds (per step, or per import)
    spread: float  # IQR, seconds
    ratio: float  # median / the plain PyTorch median of the same run
    target: float | None
    status: str
    cpu_median: float | None = None  # process CPU seconds per step (step rows only)
    cpu_ratio: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def format_table(rows: Sequence[Row]) -> str:
    header = f"{'benchmark':<34} {'median':>10} {'IQR':>9} {'ratio':>7} {'cpu ratio':>9} {'target':>7} result"
    lines = [header, "-" * len(header)]
    for row in rows:
        cpu = f"{row.cpu_ratio:.3f}" if row.cpu_ratio is not None else "-"
        target = f"{row.target:.2f}" if row.target is not None else "-"
        lines.append(
            f"{row.kind + ': ' + row.name:<34} {_ms(row.median):>10} {_ms(row.spread):>9} "
            f"{row.ratio:>7.3f} {cpu:>9} {target:>7} {row.status}"
        )
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}ms" if seconds < 1 else f"{seconds:.3f}s"


def dump_json(rows: Sequence[Row], path: Path, settings: dict[str, Any]) -> None:
    path.write_text(json.dumps({"settings": settings, "rows": [r.to_json() for r in rows]}, indent=2))
