"""Runs 2-rank Fabric jobs with the multiprocessing launchers: ``python dist_driver.py OUT_DIR``.

1. ``ddp_spawn`` (a DDPStrategy instance with a 60 s timeout), with a CSV logger and a callback:
   ``dist_checks.check_everything`` on both ranks; the Fabric object itself is pickled to the workers.
2. ``ddp_fork`` through a DDPStrategy subclass registered by name as ``"my_ddp"``.
3. Here, with one process: the checkpoint the two ranks saved is loaded by a single-device Fabric.

Prints one ``RESULT {json}`` line per step; the test asserts on them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root, for tests.fabric

from tests.fabric.helpers import dist_checks
from torchloom.core.loggers import CSVLogger
from torchloom.core.registry import STRATEGIES
from torchloom.core.strategies.ddp import DDPStrategy
from torchloom.fabric import Fabric


def report(name: str, **values: Any) -> None:
    print("RESULT " + json.dumps({"step": name, **values}), flush=True)


def spawn_run(out_dir: Path) -> None:
    counter = dist_checks.StepCounter()
    fabric = Fabric(
        accelerator="cpu",
        strategy=DDPStrategy(start_method="spawn", timeout=dist_checks.TIMEOUT),
        devices=2,
        callbacks=[counter],
        loggers=CSVLogger(out_dir, name="logs", version=0),
    )
    result = fabric.launch(dist_checks.check_everything, str(out_dir), counter)
    report("spawn", result=result, counter_in_parent=counter.steps)


def custom_strategy_run() -> None:
    import torch._dynamo  # noqa: F401 - DDP imports it on first use (seconds); forked workers inherit it from here

    STRATEGIES.register("my_ddp", dist_checks.MyDDP, start_method="fork", timeout=dist_checks.TIMEOUT)
    fabric = Fabric(accelerator="cpu", strategy="my_ddp", devices=2)
    result = fabric.launch(dist_checks.check_custom_strategy)
    report("custom", result=result, parent_strategy=type(fabric.strategy).__name__)


def load_on_one_process(out_dir: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = dist_checks.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    fmodel, foptimizer = fabric.setup(model, optimizer)
    state: dict[str, Any] = {"model": fmodel, "optimizer": foptimizer, "step": 0}
    remainder = fabric.load(out_dir / "checkpoint.pt", state)
    expected = torch.load(out_dir / "expected.pt", weights_only=True)
    same_model = all(torch.equal(model.state_dict()[k], v) for k, v in expected["model"].items())
    loaded = optimizer.state_dict()
    same_optimizer = loaded["param_groups"] == expected["optimizer"]["param_groups"] and all(
        torch.equal(loaded["state"][i]["momentum_buffer"], s["momentum_buffer"])
        for i, s in expected["optimizer"]["state"].items()
    )
    report(
        "load", remainder=remainder, restored_step=state["step"], same_model=same_model, same_optimizer=same_optimizer
    )


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    spawn_run(folder)
    custom_strategy_run()
    load_on_one_process(folder)
