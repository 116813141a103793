"""One XLA device (``single_xla``) through Fabric and the Trainer, on XLA's CPU backend (``PJRT_DEVICE=CPU``):
the same runs on the CPU are the reference. Runs in the nox ``xla`` session (``--accelerator tpu``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.xla.loops import cpu_weights, fabric_run, model, trainer_run
from torchloom.core.precision.xla import XLAPrecision
from torchloom.fabric import Fabric

pytestmark = pytest.mark.tpu


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), (name, (a[name] - b[name]).abs().max())


def test_auto_picks_one_xla_device() -> None:
    fabric = Fabric(accelerator="tpu")
    assert type(fabric.strategy).__name__ == "SingleDeviceXLAStrategy"
    assert fabric.device == torch.device("xla", 0)
    assert isinstance(fabric.precision, XLAPrecision)


def test_fabric_training_matches_the_cpu() -> None:
    expected, expected_losses = fabric_run(Fabric(accelerator="cpu"), clip=0.5)
    weights, losses = fabric_run(Fabric(accelerator="tpu", devices=1), clip=0.5)
    close(weights, expected, atol=1e-5)
    assert losses == pytest.approx(expected_losses, abs=1e-5)


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_fabric_bf16_trains_close_to_float32(precision: str) -> None:
    expected, expected_losses = fabric_run(Fabric(accelerator="cpu"))
    fabric = Fabric(accelerator="tpu", devices=1, precision=precision)
    assert fabric.precision.name == precision
    module = fabric.setup_module(model())
    assert module.module[0].weight.dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    output = module(torch.randn(2, 8, device=fabric.device))
    assert output.dtype == torch.float32  # outputs leave in float32 whatever the compute dtype
    weights, losses = fabric_run(fabric)
    close(weights, expected, atol=0.05)
    assert losses == pytest.approx(expected_losses, rel=0.05)


def test_fabric_checkpoint_round_trip(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="tpu", devices=1)
    built = model()
    module, optimizer = fabric.setup(built, torch.optim.Adam(built.parameters(), lr=0.01))  # made before the move
    loss = module(torch.randn(4, 8, device=fabric.device)).sum()
    fabric.backward(loss)
    optimizer.step()
    fabric.save(tmp_path / "ckpt.pt", {"model": module, "optimizer": optimizer, "step": 1})
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert {t.device.type for t in saved["model"].values()} == {"cpu"}  # xm.save brought them to the CPU

    torch.manual_seed(5)
    other = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    fresh, fresh_optimizer = fabric.setup(other, torch.optim.Adam(other.parameters(), lr=0.01))
    state = {"model": fresh, "optimizer": fresh_optimizer, "step": 0}
    fabric.load(tmp_path / "ckpt.pt", state)
    assert state["step"] == 1
    close(cpu_weights(fresh.state_dict()), cpu_weights(module.state_dict()), atol=0)
    exp_avg = fresh_optimizer.state_dict()["state"][0]["exp_avg"]
    assert exp_avg.device.type == "xla"
    assert torch.equal(exp_avg.cpu(), optimizer.state_dict()["state"][0]["exp_avg"].cpu())


def test_trainer_fit_matches_the_cpu_and_saves_a_checkpoint(tmp_path: Path) -> None:
    _, expected = trainer_run(str(tmp_path / "cpu"), accelerator="cpu")
    trainer, module = trainer_run(str(tmp_path / "xla"), accelerator="tpu", devices=1)
    assert type(trainer.strategy).__name__ == "SingleDeviceXLAStrategy"
    close(cpu_weights(module.state_dict()), cpu_weights(expected.state_dict()), atol=1e-5)
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(
        float(trainer_run(str(tmp_path / "cpu2"), accelerator="cpu")[0].callback_metrics["val_loss"]), abs=1e-5
    )
    trainer.save_checkpoint(tmp_path / "trainer.ckpt")
    checkpoint = torch.load(tmp_path / "trainer.ckpt", weights_only=True)
    close(checkpoint["state_dict"], cpu_weights(module.state_dict()), atol=0)


def test_without_pjrt_device_auto_is_not_xla_on_the_cpu_and_tpu_says_there_is_no_device() -> None:
    """Importing torch_xla defaults to XLA on the CPU where there is no TPU; torchloom does not take that default."""
    code = (
        "from torchloom.core import Connector\n"
        "print(type(Connector().resolve().accelerator).__name__)\n"
        "try:\n    Connector(accelerator='tpu').resolve()\n"
        "except Exception as error:\n    print(type(error).__name__, error)\n"
    )
    env = {key: value for key, value in os.environ.items() if key not in ("PJRT_DEVICE", "CPU_NUM_DEVICES")}
    finished = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert lines[0] == "CPUAccelerator"
    assert lines[1].startswith("ConfigurationError accelerator='tpu' found no XLA device"), lines
