"""Running a job's command line for a fault test: its own session, a deadline, the output and when it ended."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import job_env


@dataclass(frozen=True)
class Finished:
    """A job that ended: its exit status, its stdout and stderr, and ``time.time()`` when it ended."""

    returncode: int
    stdout: str
    stderr: str
    ended_at: float

    def explain(self) -> str:
        return f"exit code {self.returncode}\n--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-8000:]}"


def torchloom_command() -> list[str]:
    """The installed ``torchloom`` console script."""
    found = Path(sys.executable).parent / "torchloom"
    path = str(found) if found.exists() else shutil.which("torchloom")
    assert path, "the `torchloom` console script is not installed: pip install -e packages/fabric"
    return [path]


def run_command(command: list[str], timeout: float, merge_output: bool = False, **env: str) -> Finished:
    """Runs ``command`` in a fresh session; past ``timeout`` the whole session (workers too) is killed and the test fails.

    ``merge_output``: stderr goes into stdout, in the order the processes wrote it (``Finished.stderr`` is empty)."""
    stderr_to = subprocess.STDOUT if merge_output else subprocess.PIPE
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=stderr_to, text=True, env=job_env(**env), start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr = stderr or ""
        pytest.fail(f"{' '.join(command)} did not end in {timeout:.0f} s\n{stdout[-3000:]}\n{stderr[-6000:]}")
    ended_at = time.time()
    stderr = stderr or ""
    left = _left_running(process.pid, grace=10.0)
    assert not left, f"{' '.join(command)} left processes running after it exited\n{(stdout + stderr)[-6000:]}"
    return Finished(process.returncode, stdout, stderr, ended_at)


def _left_running(session: int, grace: float) -> bool:
    """Whether processes of ``session`` still run ``grace`` seconds after its leader exited (then they are killed).

    Helpers such as multiprocessing's resource tracker exit a moment after the job; a worker left behind does not."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(session, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    os.killpg(session, signal.SIGKILL)
    return True
