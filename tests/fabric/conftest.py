"""Jobs that several test modules assert on: each launched once per session, when a test first needs it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.processes import run_python

HELPERS = Path(__file__).parent / "helpers"


@pytest.fixture(scope="session")
def ddp_script_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``helpers/ddp_script.py`` (strategy "ddp": the script re-run as 2 workers), whose workers then run the
    2-rank parity loops into the returned folder: test_fabric_distributed.py reads its output, test_parity.py
    the loops' results. One launch instead of two."""
    out = tmp_path_factory.mktemp("ddp-script")
    return run_python(HELPERS / "ddp_script.py", str(out), timeout=180), out
