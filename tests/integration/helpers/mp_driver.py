"""Runs the torch.multiprocessing launchers through their paces: ``python mp_driver.py OUT_DIR METHOD...``.

For each start method: the full DDP checks (spawn: with the model passed in from this process),
then a worker that raises and one killed by SIGKILL. Prints one ``RESULT {json}`` line per scenario;
the test asserts on them. Failed checks inside a happy run surface as a WorkerFailedError result.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root, for tests.integration

from tests.integration.helpers import ddp_checks
from torchloom.core.errors import WorkerFailedError


def scenario(method: str, name: str, function: Any, *args: Any) -> dict[str, Any]:
    strategy = ddp_checks.make_strategy(method)
    assert strategy.launcher is not None
    start = time.monotonic()
    outcome: dict[str, Any] = {"method": method, "scenario": name}
    try:
        result = strategy.launcher.launch(function, strategy, *args)
        outcome["result"] = "ok"
        if name == "checks":
            reference = ddp_checks.make_model()
            optimizer = ddp_checks.make_optimizer(reference.parameters())
            torch.autograd.backward(reference.training_step(ddp_checks.global_batch()))
            optimizer.step()
            params = result["params"]
            outcome["returned_rank"] = result["rank"]
            outcome["returned_matches_reference"] = all(
                torch.allclose(params[name], p.detach(), rtol=0, atol=1e-6) for name, p in reference.named_parameters()
            )
            ddp_checks.verify_checkpoint(args[0])
            outcome["checkpoint_verified"] = True
    except WorkerFailedError as error:
        outcome.update(result="WorkerFailedError", rank=error.rank, exitcode=error.exitcode, message=str(error))
    outcome["elapsed"] = time.monotonic() - start
    return outcome


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    for method in sys.argv[2:]:
        run_dir = out_dir / method
        run_dir.mkdir(parents=True, exist_ok=True)
        model = ddp_checks.make_model() if method == "spawn" else None  # spawn pickles it into shared memory
        outcomes = [
            scenario(method, "checks", ddp_checks.run_checks, str(run_dir), model),
            scenario(method, "raise", ddp_checks.fail, "raise"),
            scenario(method, "kill", ddp_checks.fail, "kill"),
        ]
        for outcome in outcomes:
            print("RESULT " + json.dumps(outcome), flush=True)
