"""Fabric with 2 real ranks (gloo on 127.0.0.1), each job a subprocess with a timeout.

- ``helpers/dist_driver.py``: ``ddp_spawn`` running ``dist_checks.check_everything`` (collectives,
  ``rank_zero_first``, ``print``, sampler injection and ``set_epoch``, DDP training against a reference,
  ``no_backward_sync``, save on 2 ranks / load on 2, logging, callbacks), a ``DDPStrategy`` subclass
  registered as ``"my_ddp"`` (fork), and the 2-rank checkpoint loaded in one process.
- ``helpers/ddp_script.py``: strategy ``"ddp"``, where ``launch()`` re-runs the script as the workers (the
  session's ``ddp_script_job`` in conftest.py, whose workers also run test_parity.py's 2-rank loops).
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.processes import explain, run_python

HELPERS = Path(__file__).parent / "helpers"

pytestmark = pytest.mark.slow


def test_spawn_and_fork_jobs_and_a_registered_custom_strategy(tmp_path: Path) -> None:
    process = run_python(HELPERS / "dist_driver.py", str(tmp_path), timeout=180)
    assert process.returncode == 0, explain(process)
    lines = process.stdout.splitlines()
    results: dict[str, dict[str, Any]] = {}
    for line in lines:
        if line.startswith("RESULT "):
            result = json.loads(line.removeprefix("RESULT "))
            results[result["step"]] = result
    assert set(results) == {"spawn", "custom", "load"}, explain(process)

    # launch returned rank 0's result; the callback (pickled with the Fabric) counted the one step
    spawn = results["spawn"]
    assert spawn["result"]["rank"] == 0 and spawn["result"]["steps"] == 1, spawn
    assert spawn["counter_in_parent"] == 0  # the workers had their own copies
    assert "CHECKS PASSED rank=0" in lines and "CHECKS PASSED rank=1" in lines, explain(process)
    assert lines.count("PRINTED by rank 0") == 1 and "PRINTED by rank 1" not in lines, explain(process)

    # only rank 0 wrote the logs
    with open(tmp_path / "logs" / "version_0" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows == [
        {"step": "0", "loss": "0.5", "acc": "", "rank": ""},
        {"step": "1", "loss": "", "acc": "0.75", "rank": "0.0"},
    ], rows

    custom = results["custom"]
    assert custom["result"] == {"rank": 0, "strategy": "MyDDP", "barriers": 1}, custom
    assert custom["parent_strategy"] == "MyDDP"

    # saved by 2 ranks, loaded by 1: identical tensors
    load = results["load"]
    assert load == {"step": "load", "remainder": {}, "restored_step": 3, "same_model": True, "same_optimizer": True}


def test_ddp_launch_reruns_the_script_as_the_workers(
    ddp_script_job: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    process, _ = ddp_script_job  # the same launch also runs test_parity.py's 2-rank loops afterwards
    assert process.returncode == 0, explain(process)
    lines = process.stdout.splitlines()
    assert lines.count("BEFORE LAUNCH role=agent") == 1 and lines.count("BEFORE LAUNCH role=worker") == 2
    # code after launch() runs in the workers only; launch(fn) inside a worker runs fn there
    assert "WORKER rank=0 world_size=2 total=3.0 result=10" in lines, explain(process)
    assert "WORKER rank=1 world_size=2 total=3.0 result=11" in lines, explain(process)
    assert lines.count("PRINTED by local rank 0") == 1, explain(process)
