"""A worker of ``torchloom run`` or of the popen launcher (``python agent_store_worker.py OUT [launcher]``): rank 0
writes the addresses listening on ``MASTER_PORT`` (the agent's rendezvous store) to ``OUT``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.faults.test_rendezvous import listening_addresses


def report(out: Path) -> None:
    if os.environ["RANK"] == "0":
        out.write_text(",".join(listening_addresses(int(os.environ["MASTER_PORT"]))))


if __name__ == "__main__":
    if sys.argv[2:] == ["launcher"]:  # the popen launcher: this script's agent starts the workers
        from torchloom.core.environments.local import LocalEnvironment
        from torchloom.core.launchers.subprocess_script import SubprocessScriptLauncher

        SubprocessScriptLauncher(LocalEnvironment(), num_processes=2).launch(report, Path(sys.argv[1]))
    else:
        report(Path(sys.argv[1]))
