"""Sharded strategies (FSDP, model parallel) through Fabric.

In-process checks: the strategy names resolve, an optimizer holding parameters that setup replaced is
refused (for any strategy that replaces them, not just FSDP), a ``FabricOptimizer`` hands its module to
the strategy, and a one-process Fabric reads a sharded checkpoint directory.

Multi-process (real gloo ranks, each job a subprocess with a deadline): ``helpers/sharded_driver.py``
runs FSDP and tensor-parallel jobs with forked workers (see ``helpers/sharded_checks.py`` for what every
rank asserts), and the digits example trains with ``--strategy fsdp`` on 2 processes re-run from the script.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typing_extensions import override

from tests.processes import explain, job_env, run_python
from torchloom.core.checkpoint.distributed import is_sharded_checkpoint, save_sharded
from torchloom.core.launchers.subprocess_script import SubprocessScriptLauncher
from torchloom.core.strategies.fsdp import FSDPStrategy
from torchloom.core.strategies.single_device import SingleDeviceStrategy
from torchloom.fabric import Fabric, FabricUsageError

HELPERS = Path(__file__).parent / "helpers"
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "fabric" / "train_digits.py"


# ---------------------------------------------------------------------- in-process
@pytest.mark.parametrize(("name", "offload"), [("fsdp", False), ("fsdp_cpu_offload", True)])
def test_fsdp_names_resolve_to_a_script_launched_fsdp_strategy(name: str, offload: bool) -> None:
    fabric = Fabric(accelerator="cpu", strategy=name, devices=2)
    assert isinstance(fabric.strategy, FSDPStrategy)
    assert f"cpu_offload={offload}" in repr(fabric.strategy)
    assert isinstance(fabric.strategy.launcher, SubprocessScriptLauncher)
    assert fabric.precision.name == "32-true"


class Recreating(SingleDeviceStrategy):
    """A strategy that, like a sharding one, gives the module new parameter objects when it sets it up."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.optimizer_modules: list[nn.Module | None] = []

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None:
                    sub._parameters[name] = nn.Parameter(param.detach().clone())
        return module

    @override
    def get_optimizer_state(self, optimizer: torch.optim.Optimizer, module: nn.Module | None = None) -> dict[str, Any]:
        self.optimizer_modules.append(module)
        return super().get_optimizer_state(optimizer, module)


def test_an_optimizer_built_before_setup_module_is_refused_when_setup_replaced_its_parameters() -> None:
    fabric = Fabric(accelerator="cpu", strategy=Recreating(), devices=1)
    model = nn.Linear(3, 2)
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    fmodel = fabric.setup_module(model)
    with pytest.raises(FabricUsageError, match=r"holds 2 parameter\(s\) that Recreating replaced") as error:
        fabric.setup_optimizers(stale)
    message = str(error.value)
    assert "Build the optimizer after setup_module" in message and "fabric.setup(model, optimizer)" in message
    with pytest.raises(FabricUsageError, match="replaced when it set the module up"):
        stale.step()

    # built from the set-up module instead: accepted, and it knows its module for state dicts
    foptimizer = fabric.setup_optimizers(torch.optim.SGD(fmodel.parameters(), lr=0.1))
    foptimizer.state_dict()
    assert fabric.strategy.optimizer_modules == [fmodel.forward_module]  # type: ignore[attr-defined]


def test_an_optimizer_passed_to_setup_with_its_module_is_fine_when_parameters_stay() -> None:
    fabric = Fabric(accelerator="cpu", devices=1)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fmodel = fabric.setup_module(model)
    foptimizer = fabric.setup_optimizers(optimizer)  # the same parameters: nothing was replaced
    fabric.backward(fmodel(torch.ones(1, 3)).sum())
    foptimizer.step()


def test_a_one_process_fabric_loads_a_sharded_checkpoint_directory(tmp_path: Path) -> None:
    saved = nn.Linear(3, 2)
    coordinator = SingleDeviceStrategy(torch.device("cpu"))
    state = {"model": saved.state_dict(), "step": 4, "note": "hi"}
    save_sharded(tmp_path / "ckpt", state, {"model": "data", "step": "data", "note": "data"}, coordinator)
    assert is_sharded_checkpoint(tmp_path / "ckpt")

    fabric = Fabric(accelerator="cpu", devices=1)
    model = nn.Linear(3, 2)
    loaded: dict[str, Any] = {"model": fabric.setup(model), "step": 0}
    assert fabric.load(tmp_path / "ckpt", loaded) == {"note": "hi"}
    assert loaded["step"] == 4
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.state_dict().items())


# ---------------------------------------------------------------------- multi-process
@pytest.mark.slow
def test_fsdp_and_tensor_parallel_jobs(tmp_path: Path) -> None:
    process = run_python(HELPERS / "sharded_driver.py", str(tmp_path), timeout=240)
    assert process.returncode == 0, explain(process)
    results = {}
    for line in process.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line.removeprefix("RESULT "))
            results[result.pop("step")] = result
    assert list(results) == ["fsdp", "fsdp_full", "one_rank", "tensor_parallel", "single_device"], explain(process)
    assert results["fsdp"]["result"]["rank"] == 0 and len(results["fsdp"]["result"]["norms"]) == 3
    assert results["single_device"]["result"] == {"sharded": True, "full.pt": True, "tp": True}


@pytest.mark.slow
def test_the_digits_example_trains_with_fsdp(tmp_path: Path) -> None:
    options = ["--strategy", "fsdp", "--devices", "2", "--epochs", "3", "--out", str(tmp_path)]
    process = run_python(EXAMPLE, *options, timeout=180, env=job_env())
    assert process.returncode == 0, explain(process)
    match = re.search(
        r"^held-out accuracy: ([\d.]+) \(359 images; 2 processes, FSDPStrategy, 32-true", process.stdout, re.M
    )
    assert match is not None, explain(process)
    assert float(match.group(1)) > 0.85, process.stdout
    assert is_sharded_checkpoint(tmp_path / "digits.pt")  # FSDP saves a sharded directory by default
