"""Runs the sharded Fabric jobs with forked workers: ``python sharded_driver.py OUT_DIR``.

1. FSDP on 2 ranks (``sharded_checks.check_fsdp``): meta init, setup with an optimizer made before
   sharding, training against plain PyTorch, global-norm clipping, accumulation, the stale-optimizer
   error, a sharded save and loads.
2. FSDP on 2 ranks with ``state_dict_type="full"`` and CPU offload: loads the sharded directory, saves
   one file and loads it back.
3. FSDP on 1 rank: the 2-rank sharded checkpoint, resharded.
4. Model parallel on 2 ranks: 2-way tensor parallel through the user's ``parallelize_fn``.
5. Here, with a single-device Fabric: the sharded directories and the full file load into plain models.

Prints one ``RESULT {json}`` line per step; the test asserts on them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root, for tests.fabric

from tests.fabric.helpers import sharded_checks as checks
from tests.sharded_models import Net
from torchloom.core.strategies.fsdp import FSDPStrategy
from torchloom.core.strategies.model_parallel import ModelParallelStrategy
from torchloom.fabric import Fabric


def report(name: str, **values: Any) -> None:
    print("RESULT " + json.dumps({"step": name, **values}), flush=True)


def launch(strategy: Any, devices: int, function: Any, folder: Path) -> Any:
    fabric = Fabric(accelerator="cpu", strategy=strategy, devices=devices)
    return fabric.launch(function, str(folder))


def single_device_loads(folder: Path) -> dict[str, bool]:
    """A plain one-process Fabric reads the sharded directories (as full tensors) and the full file."""
    fabric = Fabric(accelerator="cpu", devices=1)
    results = {}
    expected = torch.load(folder / "expected.pt", weights_only=True)
    for name in ("sharded", "full.pt"):
        model = Net()
        optimizer = torch.optim.Adam(model.parameters())
        fmodel, foptimizer = fabric.setup(model, optimizer)
        state: dict[str, Any] = {"model": fmodel, "optimizer": foptimizer, "step": 0}
        fabric.load(folder / name, state, strict=False)
        same_model = all(torch.equal(model.state_dict()[k], v) for k, v in expected["model"].items())
        loaded = optimizer.state_dict()
        names = list(expected["model"])  # the optimizer's parameter order
        same_state = all(
            torch.equal(loaded["state"][index][key], value)
            for index, parameter in enumerate(names)
            for key, value in expected["optimizer_state"]["state"][parameter].items()
        )
        results[name] = same_model and same_state and state["step"] == checks.STEPS
    tp_expected = torch.load(folder / "tp_expected.pt", weights_only=True)
    mlp = checks.MLP()
    sgd = torch.optim.SGD(mlp.parameters(), lr=0.5, momentum=0.9)
    fmlp, fsgd = fabric.setup(mlp, sgd)
    fabric.load(folder / "tp", {"model": fmlp, "optimizer": fsgd}, strict=False)
    same_mlp = all(torch.allclose(mlp.state_dict()[k], v, atol=1e-5) for k, v in tp_expected["model"].items())
    momentum = sgd.state_dict()["state"]
    same_momentum = all(
        torch.allclose(momentum[i]["momentum_buffer"], s["momentum_buffer"], atol=1e-5)
        for i, s in tp_expected["optimizer"]["state"].items()
    )
    results["tp"] = same_mlp and same_momentum and sgd.param_groups[0]["lr"] == 0.1
    return results


def main(folder: Path) -> None:
    timeout = checks.TIMEOUT
    fsdp = launch(FSDPStrategy(start_method="fork", timeout=timeout), 2, checks.check_fsdp, folder)
    report("fsdp", result=fsdp)
    full = FSDPStrategy(start_method="fork", timeout=timeout, state_dict_type="full", cpu_offload=True)
    report("fsdp_full", result=launch(full, 2, checks.check_fsdp_full, folder))
    report(
        "one_rank", result=launch(FSDPStrategy(start_method="fork", timeout=timeout), 1, checks.check_one_rank, folder)
    )
    tensor_parallel = ModelParallelStrategy(checks.tensor_parallel, start_method="fork", timeout=timeout)
    report("tensor_parallel", result=launch(tensor_parallel, 2, checks.check_tensor_parallel, folder))
    report("single_device", result=single_device_loads(folder))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
