"""A user script that builds the default process group three times in each worker of a popen launch.

``python reinit_worker.py``: the first invocation becomes the elastic agent and starts two workers;
each worker (set up by the launcher) reduces, tears down, sets up again, reduces, and so on. Under
elastic the workers share the agent's store, so every new group must not trip over the old one's keys.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root, for tests.integration

from tests.integration.helpers import ddp_checks
from torchloom.core.distributed import is_distributed
from torchloom.core.strategies.ddp import DDPStrategy

ROUNDS = 3


def reinit(strategy: DDPStrategy) -> None:
    rank = strategy.global_rank
    sums = []
    for round_ in range(ROUNDS):
        if round_ > 0:
            strategy.setup_environment()
        total = strategy.all_reduce(torch.tensor(float(rank + 1 + round_)), reduce_op="sum")
        sums.append(float(total))
        strategy.teardown()
        assert not is_distributed(), f"round {round_}: teardown left the process group"
    ddp_checks.say(f"REINIT rank={rank} sums={sums}")


if __name__ == "__main__":
    strategy = ddp_checks.make_strategy("popen")
    assert strategy.launcher is not None
    strategy.launcher.launch(reinit, strategy)
