"""Running a Python script as a job for a test: a clean environment, a deadline, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Variables that would make a child believe it is already part of some other job.
_JOB_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK")
_JOB_PREFIXES = ("TORCHLOOM_", "TORCHELASTIC_")


def job_env(**extra: str) -> dict[str, str]:
    """This process's environment without job variables, with one OpenMP thread per rank, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _JOB_VARIABLES and not key.startswith(_JOB_PREFIXES)
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_python(
    script: str | Path, *args: str, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs ``python script *args`` in its own session; past ``timeout`` the whole session (workers too) is killed."""
    command = [sys.executable, str(script), *args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=job_env() if env is None else env,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{Path(script).name} did not finish in {timeout:.0f} s\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def explain(process: subprocess.CompletedProcess[str]) -> str:
    """The end of a job's output, for an assertion message."""
    return f"exit code {process.returncode}\n--- stdout\n{process.stdout[-4000:]}\n--- stderr\n{process.stderr[-6000:]}"
