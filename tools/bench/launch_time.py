"""Time to first step of a 2-rank job, by how it is launched.

- ``torchrun``: this file as a plain-DDP script under ``python -m torch.distributed.run`` (the reference);
- ``torchloom run``: this file as a Fabric script under ``torchloom run --accelerator cpu --devices 2``;
- ``trainer``: this file with plain ``python``; ``Trainer(strategy="ddp", devices=2)`` re-runs it as its workers.

The script (``python tools/bench/launch_time.py JOB.json``) trains the small workload with the training code of
``step_overhead.py``. Time runs from just before the parent starts the command (``time.perf_counter``) to the
moment rank 0 finished its first optimizer step (rank 0 writes ``time.time()`` to a file; the parent converts
with a ``time.time()`` / ``perf_counter`` pair taken at the start). Interleaved, medians over repetitions. The
issue sets no target here, so the rows are "info", with the ratio to torchrun.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from tools.bench.common import Job, Row, ratio_rows, run_command, torchrun_command, write_job
from tools.bench.step_overhead import WORKLOADS, child

__all__ = ["LAUNCHERS", "run_launch_time"]

WORLD_SIZE = 2
SCRIPT = str(Path(__file__).resolve())
# row name -> the training variant the script runs
LAUNCHERS = {"torchrun plain DDP": "plain", "torchloom run fabric": "fabric", "python trainer ddp": "trainer"}
TIMEOUT_S = 300


def launch_command(launcher: str, job_path: str) -> list[str]:
    if launcher == "torchrun plain DDP":
        return torchrun_command(WORLD_SIZE, [SCRIPT, job_path])
    if launcher == "torchloom run fabric":  # the `torchloom` console script is this module's main()
        cli = ["-m", "torchloom.fabric.cli", "run", "--accelerator", "cpu", f"--devices={WORLD_SIZE}"]
        return [sys.executable, *cli, SCRIPT, job_path]
    return [sys.executable, SCRIPT, job_path]


def measure_once(launcher: str, scratch: str, rep: int) -> float:
    """Seconds from starting the command to rank 0's first finished optimizer step."""
    stem = Path(scratch, f"{LAUNCHERS[launcher]}-{rep}")
    stamp = Path(f"{stem}.first-step")
    config = {"workload": asdict(WORKLOADS["small"]), "precision": "32-true", "steps": 1}
    job = Job(LAUNCHERS[launcher], [config], 0, str(stem), world_size=WORLD_SIZE, first_step_file=str(stamp))
    command = launch_command(launcher, write_job(job))
    wall_offset = time.time() - time.perf_counter()  # perf_counter -> time.time, to read the child's stamp
    started = time.perf_counter()
    run_command(command, TIMEOUT_S)
    return float(stamp.read_text()) - (started + wall_offset)


def run_launch_time(repetitions: int) -> list[Row]:
    seconds: dict[str, list[float]] = {launcher: [] for launcher in LAUNCHERS}
    with tempfile.TemporaryDirectory() as scratch:
        for rep in range(repetitions):
            for launcher in LAUNCHERS:
                seconds[launcher].append(measure_once(launcher, scratch, rep))
    return ratio_rows("launch", seconds, "torchrun plain DDP", {})


if __name__ == "__main__":
    child(sys.argv[1])
