"""``python popen_restart_job.py OUT MAX_RESTARTS``: SubprocessScriptLauncher(max_restarts=...) re-runs this script as
2 workers; on the first attempt rank 1 exits with code 3. Every worker that finishes writes
``OUT/attempt<restart count>-rank<rank>``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from torchloom.core.environments.local import LocalEnvironment
from torchloom.core.launchers import SubprocessScriptLauncher


def work(out: Path) -> None:
    attempt, rank = os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["RANK"]
    if attempt == "0" and rank == "1":
        os._exit(3)
    (out / f"attempt{attempt}-rank{rank}").touch()


if __name__ == "__main__":
    launcher = SubprocessScriptLauncher(LocalEnvironment(), 2, max_restarts=int(sys.argv[2]))
    launcher.launch(work, Path(sys.argv[1]))
