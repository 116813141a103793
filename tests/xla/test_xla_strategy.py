"""``strategy="xla"`` for real, through ``torch_xla.launch``: one replica on XLA's CPU backend (more would hang
in the gradient all-reduce, pytorch/xla#9089); every replica of a TPU host when run there (PJRT_DEVICE=TPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.xla.loops import fabric_run, trainer_run
from torchloom.fabric import Fabric

pytestmark = pytest.mark.tpu
ROOT = Path(__file__).resolve().parents[2]
ON_TPU_HOST = os.environ.get("PJRT_DEVICE", "").upper() == "TPU"


def run_job(tmp_path: Path, **env: str) -> dict[str, Any]:
    out = tmp_path / "out.pt"
    finished = subprocess.run(
        [sys.executable, "-m", "tests.xla.replica_job", str(out)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-6000:]
    result: dict[str, Any] = torch.load(out, weights_only=False)
    return result


@pytest.mark.skipif(ON_TPU_HOST, reason="the one-replica run is for XLA's CPU backend")
def test_one_replica_trains_like_the_cpu_through_fabric_launch_and_the_trainer(tmp_path: Path) -> None:
    result = run_job(tmp_path, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1")
    assert result["strategy"] == "XLAStrategy"
    assert (result["world_size"], result["device"], result["broadcast"]) == (1, "xla:0", "from rank 0")
    assert torch.equal(result["gathered"], torch.tensor([[0.0]]))
    expected, losses = fabric_run(Fabric(accelerator="cpu"), clip=0.5)
    for name, weight in expected.items():
        assert torch.allclose(result["weights"][name], weight, atol=1e-5), name
    assert result["losses"] == pytest.approx(losses, abs=1e-5)
    _, module = trainer_run(str(tmp_path / "cpu"), accelerator="cpu")
    for name, weight in module.state_dict().items():
        assert torch.allclose(result["trainer_weights"][name], weight, atol=1e-5), name


@pytest.mark.skipif(not ON_TPU_HOST, reason="needs a TPU host (PJRT_DEVICE=TPU): XLA on the CPU hangs in collectives")
def test_every_replica_of_a_tpu_host_trains_together(tmp_path: Path) -> None:
    result = run_job(tmp_path)
    world = result["world_size"]
    assert world > 1
    assert torch.equal(result["gathered"].flatten(), torch.arange(world, dtype=torch.float32))
    assert result["broadcast"] == "from rank 0"
    assert all(torch.isfinite(weight).all() for weight in result["weights"].values())
