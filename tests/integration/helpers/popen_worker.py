"""A user script with DDPStrategy(start_method="popen"): ``python popen_worker.py MODE OUT_DIR``.

MODE is ``checks`` (every DDP check, then exit 0), ``raise`` or ``kill`` (rank 1 fails), or ``node``
(one worker on this node of a two-node job; set NODE_RANK, MASTER_ADDR and MASTER_PORT).
The first invocation becomes the elastic agent; the two workers it starts run this file again.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root, for tests.integration

from tests.integration.helpers import ddp_checks

if __name__ == "__main__":
    mode, out_dir = sys.argv[1], sys.argv[2]
    strategy = ddp_checks.make_strategy("popen", num_nodes=2 if mode == "node" else 1)
    assert strategy.launcher is not None
    role = "worker" if "LOCAL_RANK" in os.environ else "agent"
    ddp_checks.say(f"STARTED role={role} pid={os.getpid()}")
    if mode == "checks":
        strategy.launcher.launch(ddp_checks.run_checks, strategy, out_dir)
    elif mode == "node":
        strategy.launcher.launch(ddp_checks.report_node, strategy)
    else:
        strategy.launcher.launch(ddp_checks.fail, strategy, mode)
    ddp_checks.say(f"AFTER LAUNCH role={role}")
