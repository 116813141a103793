"""Shared pieces of the benchmarks: the child environment, subprocess runs, statistics, targets and the table."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MEMORY_ENV",
    "ROOT",
    "Job",
    "Row",
    "bench_env",
    "format_table",
    "free_port",
    "fsdp_available",
    "iqr",
    "load_job",
    "max_rss_bytes",
    "median",
    "rank",
    "ratio_rows",
    "read_reports",
    "run_job",
    "run_command",
    "run_python",
    "run_torchrun",
    "torchrun_command",
    "verdict",
    "write_job",
    "write_report",
]

ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 1800  # one child of the full configuration; the quick ones take seconds


# For the memory rows: large blocks come from mmap and go back to the system when freed. With glibc's
# default (a threshold that rises as blocks are freed) FSDP's per-step gather/scatter buffers land on the
# heap and fragment it: a 2-rank CPU run then peaks *above* DDP (1.25x measured) instead of well below.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 10), "MALLOC_TRIM_THRESHOLD_": "0"}


def bench_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
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
    env.update(overrides or {})
    return env


def run_command(command: Sequence[str], timeout: float, env: Mapping[str, str] | None = None) -> str:
    """Run ``command`` from the repository root in its own session; return its stdout.

    The session lets a timeout kill the whole job (a launcher's workers too), so nothing outlives a failed run.
    """
    process = subprocess.Popen(
        list(command),
        cwd=ROOT,
        env=bench_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(process.pid)
        _, stderr = process.communicate()
        raise RuntimeError(f"benchmark child {list(command)} ran past {timeout} s:\n{stderr[-4000:]}") from None
    finally:
        _kill_session(process.pid)  # stray workers of a finished launcher
    if process.returncode != 0:
        raise RuntimeError(f"benchmark child {list(command)} failed ({process.returncode}):\n{stderr[-4000:]}")
    return stdout


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(args: Sequence[str], timeout: float = CHILD_TIMEOUT_S, env: Mapping[str, str] | None = None) -> str:
    """Run ``python <args>`` from the repository root with the bench environment; return its stdout."""
    return run_command([sys.executable, *args], timeout, env)


def torchrun_command(nproc: int, args: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` local workers, its rendezvous on 127.0.0.1."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "--max-restarts=0",
        *args,
    ]


def run_torchrun(
    nproc: int, args: Sequence[str], timeout: float = CHILD_TIMEOUT_S, env: Mapping[str, str] | None = None
) -> str:
    return run_command(torchrun_command(nproc, args), timeout, env)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fsdp_available() -> bool:
    """Whether a strategy is registered as "fsdp" (the sharded strategy is written separately)."""
    from torchloom.core.registry import STRATEGIES

    return "fsdp" in STRATEGIES.names()


# ------------------------------------------------------------------ jobs: what a child trains, what each rank reports
@dataclass(frozen=True)
class Job:
    """What one process (or each rank of one job) runs; rank r reports to ``{out}-rank{r}.json``."""

    variant: str
    configs: list[dict[str, Any]]  # trained in turn, e.g. {"workload": ..., "precision": ..., "steps": ...}
    warmup: int
    out: str
    world_size: int = 1
    device: str = "cpu"  # "cpu" or "cuda"
    first_step_file: str | None = None  # rank 0 writes time.time() here when its first optimizer step is done
    extra: dict[str, Any] = field(default_factory=dict)


def rank() -> int:
    """This process's global rank under torchrun or torchloom's launchers; 0 in a plain process."""
    return int(os.environ.get("RANK", "0"))


def max_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def write_job(job: Job) -> str:
    path = Path(f"{job.out}.job.json")
    path.write_text(json.dumps(asdict(job)))
    return str(path)


def load_job(path: str) -> Job:
    return Job(**json.loads(Path(path).read_text()))


def write_report(job: Job, report: dict[str, Any]) -> None:
    """This rank's report (its rank and peak RSS are added)."""
    report = {"rank": rank(), "max_rss": max_rss_bytes(), **report}
    Path(f"{job.out}-rank{rank()}.json").write_text(json.dumps(report))


def read_reports(job: Job) -> list[dict[str, Any]]:
    """What each rank of a finished job wrote, by rank."""
    return [json.loads(Path(f"{job.out}-rank{r}.json").read_text()) for r in range(job.world_size)]


def run_job(
    job: Job, module: str, torchrun: bool | None = None, env: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Run ``python -m module JOB.json``, under torchrun when ``torchrun`` (default: with several ranks)."""
    job_path = write_job(job)
    if job.world_size > 1 if torchrun is None else torchrun:
        run_torchrun(job.world_size, ["-m", module, job_path], env=env)
    else:
        run_python(["-m", module, job_path], env=env)
    return read_reports(job)


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

    kind: str  # the section: "step", "ddp step", "import", "launch", "memory", "gpu step", "gpu tokens"
    name: str
    median: float  # in `unit`: seconds (per step, per import, to the first step) or bytes (peak RSS)
    spread: float  # IQR, same unit
    ratio: float  # median / the reference median of the same run (plain PyTorch, import torch, torchrun)
    target: float | None
    status: str
    cpu_median: float | None = None  # process CPU seconds per step (step rows only)
    cpu_ratio: float | None = None
    unit: str = "s"  # "s" or "B"
    tokens_per_s: float | None = None  # throughput rows
    ratio_spread: float | None = None  # IQR of the per-round ratios (paired step rows)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ratio_rows(
    kind: str,
    samples: Mapping[str, Sequence[float]],
    reference: str,
    targets: Mapping[str, float | None],
    unit: str = "s",
) -> list[Row]:
    """One row per name in ``samples`` (in order): median, IQR, ratio to ``reference``'s median, verdict."""
    base = median(samples[reference])
    rows = []
    for name, values in samples.items():
        ratio = median(values) / base
        target = targets.get(name)
        rows.append(Row(kind, name, median(values), iqr(values), ratio, target, verdict(ratio, target), unit=unit))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    header = (
        f"{'benchmark':<44} {'median':>10} {'IQR':>9} {'ratio':>7} {'ratio IQR':>9} {'cpu ratio':>9} {'target':>7} "
        "result"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        cpu = f"{row.cpu_ratio:.3f}" if row.cpu_ratio is not None else "-"
        ratio_spread = f"{row.ratio_spread:.3f}" if row.ratio_spread is not None else "-"
        target = f"{row.target:.2f}" if row.target is not None else "-"
        note = f"  {row.tokens_per_s:,.0f} tokens/s" if row.tokens_per_s is not None else ""
        lines.append(
            f"{row.kind + ': ' + row.name:<44} {_value(row.median, row.unit):>10} {_value(row.spread, row.unit):>9} "
            f"{row.ratio:>7.3f} {ratio_spread:>9} {cpu:>9} {target:>7} {row.status}{note}"
        )
    return "\n".join(lines)


def _value(amount: float, unit: str) -> str:
    if unit == "B":
        return f"{amount / 2**20:.1f}MiB"
    return f"{amount * 1e3:.3f}ms" if amount < 1 else f"{amount:.3f}s"


def dump_json(rows: Sequence[Row], path: Path, settings: dict[str, Any]) -> None:
    path.write_text(json.dumps({"settings": settings, "rows": [r.to_json() for r in rows]}, indent=2))
