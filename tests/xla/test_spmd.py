"""``xla_spmd`` (FSDPv2) and ``xla_spmd_data`` over 2 and 4 XLA CPU devices, each run in its own process
(``tests/xla/spmd_job.py``; SPMD mode and the device count are fixed per process). The reference is the same
training on the CPU in this process."""

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


@pytest.fixture(scope="module")
def cpu_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    weights, losses = fabric_run(Fabric(accelerator="cpu"), clip=0.5)
    _, trained = trainer_run(str(tmp_path_factory.mktemp("cpu")), accelerator="cpu")
    return {"weights": weights, "losses": losses, "trainer_weights": trained.state_dict()}


def run_job(tmp_path: Path, devices: int, strategy: str) -> dict[str, Any]:
    out = tmp_path / "out.pt"
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(
        [sys.executable, "-m", "tests.xla.spmd_job", str(out), strategy],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-6000:]
    result: dict[str, Any] = torch.load(out, weights_only=False)
    return result


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name].float(), atol=1e-5), (name, (a[name] - b[name]).abs().max())


@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("strategy", ["xla_spmd", "xla_spmd_data"])
def test_spmd_training_matches_one_device_and_checkpoints_round_trip(
    tmp_path: Path, cpu_reference: dict[str, Any], devices: int, strategy: str
) -> None:
    result = run_job(tmp_path, devices, strategy)
    assert result["strategy"] == "XLASPMDStrategy"
    specs = result["specs"]
    if strategy == "xla_spmd":  # FSDPv2: every parameter is split over all the devices
        for name, spec in specs.items():
            assert spec.startswith("{devices=[") and spec.endswith(",".join(map(str, range(devices))) + "}"), (
                name,
                spec,
            )
        assert result["restored"]["specs_after_load"]["0.weight"] == specs["0.weight"]
    else:  # sharded data parallel: parameters replicated
        assert all("devices=[" not in spec for spec in specs.values()), specs
    close(result["weights"], cpu_reference["weights"])
    assert result["losses"] == pytest.approx(cpu_reference["losses"], abs=1e-5)
    close(result["trainer_weights"], cpu_reference["trainer_weights"])
    restored = result["restored"]
    assert restored["step"] == 7 and restored["weights_equal"] and restored["exp_avg_equal"], restored
    replicated = {"", "{replicated}"}  # no sharding yet / replicated explicitly: the same placement
    exp_avg_specs = restored["exp_avg_specs_after_load"]
    if strategy == "xla_spmd":  # optimizer state read shard by shard, sharded like its parameter
        assert exp_avg_specs == specs, restored
        assert restored["whole_file_exp_avg_spec"] == specs["0.weight"]  # read whole, then sharded on load
    else:
        assert set(exp_avg_specs.values()) <= replicated, restored
    assert restored["step_after_load"] == 1.0, restored
    # the checkpoint is FSDP's sharded format: one chunk per device for a sharded weight, readable on the CPU
    assert restored["chunks_of_first_weight"] == (devices if strategy == "xla_spmd" else 1)
    assert restored["cpu_reads_it"] and restored["consolidates"] and restored["cpu_optimizer_state"] == [0, 1, 2, 3], (
        restored
    )
    assert restored["loads_cpu_checkpoint"], restored
    resume = result["trainer_resume"]  # the Trainer resumes from its sharded checkpoint, read shard by shard
    assert resume["checkpoint_is_sharded"] and resume["resumed_steps"] == 12, resume
    assert resume["resumed_equals_straight"], resume
    if strategy == "xla_spmd":  # 4 parameters and their 4 momentum buffers
        assert resume["shards_loaded_in_place"] == 8 and resume["momentum_spec"] == resume["param_spec"], resume
    if strategy == "xla_spmd":  # read shard by shard into each sharded parameter, which stays sharded
        assert restored["shards_loaded_in_place"] == len(specs)
        assert restored["spec_after_cpu_load"] == specs["0.weight"]
    else:  # replicated parameters: nothing to read shard-wise
        assert restored["shards_loaded_in_place"] == 0
