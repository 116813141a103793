"""Real 2-rank DDP jobs over gloo, under each launcher; each job runs as a subprocess with a timeout.

Many checks share one launch (see helpers/ddp_checks.py): every rank asserts them itself, and a
failed assertion fails its worker, which fails the launch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.processes import explain, job_env, run_python
from torchloom.core.environments.local import find_free_port

from .helpers import ddp_checks

HELPERS = Path(__file__).parent / "helpers"
FAILURE_DEADLINE_S = 30.0

pytestmark = pytest.mark.slow


def test_popen_launcher_runs_the_ddp_checks_on_two_workers(tmp_path: Path) -> None:
    process = run_python(HELPERS / "popen_worker.py", "checks", str(tmp_path), timeout=180)
    assert process.returncode == 0, explain(process)
    lines = process.stdout.splitlines()
    assert sum(line.startswith("STARTED role=agent") for line in lines) == 1, explain(process)
    assert sum(line.startswith("STARTED role=worker") for line in lines) == 2, explain(process)
    for rank in (0, 1):
        assert f"WORKER rank={rank} local_rank={rank} world_size=2" in lines, explain(process)
        assert f"CHECKS PASSED rank={rank}" in lines, explain(process)
    # the agent exits inside launch(): only the two workers get past it
    assert lines.count("AFTER LAUNCH role=worker") == 2 and "AFTER LAUNCH role=agent" not in lines
    ddp_checks.verify_checkpoint(str(tmp_path))  # this process has no process group: a plain single-device load


def test_popen_launcher_joins_two_nodes_into_one_job(tmp_path: Path) -> None:
    """Two invocations with NODE_RANK 0 and 1 and the same MASTER_ADDR/PORT: one job of world size 2."""
    port = str(find_free_port())
    nodes = [
        subprocess.Popen(
            [sys.executable, str(HELPERS / "popen_worker.py"), "node", str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=job_env(NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=120) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for rank, (node, (stdout, stderr)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}: {stdout}\n{stderr}"
        assert f"NODE rank={rank} node_rank={rank} world_size=2 sum=11.0" in stdout.splitlines(), stdout + stderr


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_popen_launcher_reports_a_failed_worker_quickly(tmp_path: Path, mode: str) -> None:
    start = time.monotonic()
    process = run_python(HELPERS / "popen_worker.py", mode, str(tmp_path), timeout=120)
    elapsed = time.monotonic() - start
    assert process.returncode != 0, explain(process)
    assert elapsed < FAILURE_DEADLINE_S, f"took {elapsed:.1f} s\n{explain(process)}"
    error = process.stderr[process.stderr.index("WorkerFailedError: ") :]
    assert error.startswith("WorkerFailedError: Worker with global rank 1 "), explain(process)
    if mode == "raise":
        assert "Traceback" in error and 'raise ValueError("boom from rank 1")' in error, explain(process)
        assert "ValueError: boom from rank 1" in error, explain(process)
    else:
        assert "was killed by signal SIGKILL" in error, explain(process)
    assert "rank 0 (pid " in error, explain(process)


def test_multiprocessing_launchers_run_checks_and_report_failures(tmp_path: Path) -> None:
    process = run_python(HELPERS / "mp_driver.py", str(tmp_path), "fork", "spawn", timeout=240)
    assert process.returncode == 0, explain(process)
    outcomes: dict[tuple[str, str], dict[str, Any]] = {}
    for line in process.stdout.splitlines():
        if line.startswith("RESULT "):
            outcome = json.loads(line.removeprefix("RESULT "))
            outcomes[outcome["method"], outcome["scenario"]] = outcome
    assert len(outcomes) == 6, explain(process)
    for method in ("fork", "spawn"):
        checks = outcomes[method, "checks"]
        assert checks["result"] == "ok", checks.get("message")
        assert checks["returned_rank"] == 0 and checks["returned_matches_reference"], checks
        assert checks["checkpoint_verified"], checks
        for mode in ("raise", "kill"):
            failed = outcomes[method, mode]
            assert failed["result"] == "WorkerFailedError" and failed["rank"] == 1, failed
            assert failed["elapsed"] < FAILURE_DEADLINE_S, failed
            assert failed["message"].startswith("Worker with global rank 1 "), failed
        raised = outcomes[method, "raise"]
        assert raised["exitcode"] == 1 and "ValueError: boom from rank 1" in raised["message"], raised
        assert 'raise ValueError("boom from rank 1")' in raised["message"], raised
        killed = outcomes[method, "kill"]
        assert killed["exitcode"] == -9 and "SIGKILL" in killed["message"], killed
