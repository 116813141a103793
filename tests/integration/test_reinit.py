"""A worker of a popen (torch elastic) launch can destroy its process group and build a new one, repeatedly."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.processes import explain, run_python

pytestmark = pytest.mark.slow


def test_popen_workers_rebuild_the_default_process_group() -> None:
    process = run_python(Path(__file__).parent / "helpers" / "reinit_worker.py", timeout=90)
    assert process.returncode == 0, explain(process)
    lines = process.stdout.splitlines()
    # rank r adds r + 1 + round: sums 3, 5, 7 on both ranks
    for rank in (0, 1):
        assert f"REINIT rank={rank} sums=[3.0, 5.0, 7.0]" in lines, explain(process)
