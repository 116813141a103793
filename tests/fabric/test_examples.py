"""Every Fabric example in docs/examples/fabric runs, as a user would run it, and does what it says.

- ``train_digits.py`` with no arguments (what ``nox -s demo`` and the README run): DDP on 2 CPU
  processes, held-out accuracy above 0.9, a checkpoint, TensorBoard events read back with
  tensorboard's own reader, a CSV file, and the ``tensorboard --logdir`` command; then under
  ``torchloom run``, whose options win over the script's.
- ``gradient_accumulation.py``: no sync before the last micro-batch, one after, same weights as one big batch.
- ``save_resume.py``: the resumed run ends bit-identical to the uninterrupted one, on one process
  and on 2 DDP processes in 16-mixed (where the grad scaler's state must be in the checkpoint).
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples" / "fabric"
TIMEOUT = 180  # seconds per run; each takes 5-15 s here

pytestmark = pytest.mark.slow


def run(command: list[str], cwd: Path) -> str:
    """Runs ``command`` in a clean environment and returns its output; fails the test on a non-zero exit."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TORCHLOOM_")}
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE"):
        environment.pop(name, None)
    environment.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    output = process.stdout + process.stderr
    assert process.returncode == 0, f"{' '.join(command)} exited with {process.returncode}:\n{output[-8000:]}"
    return output


def example(name: str, *args: str, cwd: Path) -> str:
    return run([sys.executable, str(EXAMPLES / name), *args], cwd)


def found(pattern: str, output: str) -> str:
    match = re.search(pattern, output, re.M)
    assert match is not None, f"no line matching {pattern!r} in:\n{output[-4000:]}"
    return match.group(1)


def test_train_digits_with_its_default_settings(tmp_path: Path) -> None:
    output = example("train_digits.py", cwd=tmp_path)  # no arguments: exactly the README's demo

    accuracy = float(found(r"^held-out accuracy: ([\d.]+) \(359 images; 2 processes, DDPStrategy, 32-true", output))
    assert accuracy > 0.9, output
    assert output.count("held-out accuracy:") == 1, "only rank 0 reports"

    checkpoint = Path(found(r"^checkpoint: (.+)$", output))
    assert checkpoint == (tmp_path / "runs" / "digits" / "digits.pt").resolve()
    state = torch.load(checkpoint, weights_only=True)
    assert set(state) == {"model", "optimizer", "epoch", "precision", "torchloom_version"} and state["epoch"] == 10
    assert "features.0.weight" in state["model"], "no wrapper prefix in the saved names"

    log_dir, csv_file = found(r"^logs: (.+) \(TensorBoard\)", output), found(r", (.+) \(CSV\)$", output)
    logdir_arg = found(r"^view the logs: \S*tensorboard --logdir (.+) \(then open http://localhost:6006\)$", output)
    assert Path(log_dir).parent == Path(logdir_arg) == (tmp_path / "runs" / "digits" / "tensorboard").resolve()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    accuracies = events.Scalars("val_accuracy")
    assert [event.step for event in accuracies] == list(range(10))
    assert accuracies[-1].value == pytest.approx(accuracy, abs=1e-4)
    assert len(events.Scalars("train_loss")) == 10

    with open(csv_file, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["step"] for row in rows] == [str(epoch) for epoch in range(10)]
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(accuracy, abs=1e-4)


def test_train_digits_under_torchloom_run_takes_the_cli_settings(tmp_path: Path) -> None:
    script = str(EXAMPLES / "train_digits.py")
    command = [sys.executable, "-m", "torchloom.fabric.cli", "run", "--devices", "2", "--precision", "bf16-mixed"]
    output = run([*command, script, "--epochs", "2", "--out", str(tmp_path)], tmp_path)
    assert "Fabric(precision='32-true') in the code, --precision bf16-mixed from the CLI" in output, output
    found(r"^held-out accuracy: ([\d.]+) \(359 images; 2 processes, DDPStrategy, bf16-mixed", output)
    assert (tmp_path / "digits.pt").is_file()


def test_gradient_accumulation(tmp_path: Path) -> None:
    output = example("gradient_accumulation.py", cwd=tmp_path)
    assert "= a global batch of 128" in output, output
    assert "gradients differed across processes before the last micro-batch: yes" in output, output
    assert "gradients identical across processes after the last micro-batch: yes" in output, output
    difference = float(found(r"max \|difference\| (\S+) \(match", output))
    assert difference < 1e-5
    assert output.count("step 12/12") == 1


@pytest.mark.parametrize(
    "options",
    [[], ["--strategy", "ddp", "--devices", "2", "--precision", "16-mixed"]],
    ids=["one-process", "ddp-16-mixed"],
)
def test_save_and_resume_in_a_new_process(tmp_path: Path, options: list[str]) -> None:
    out = tmp_path.resolve()
    first = example("save_resume.py", *options, "--out", str(out), cwd=out)
    assert f"checkpoint after step 30 of 60: {out / 'checkpoint.pt'}" in first, first
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 30
    if "16-mixed" in options:
        assert saved["precision"]["scaler"]["scale"] < 2.0**16, "the scaler had backed off; its state is saved"

    second = example("save_resume.py", *options, "--out", str(out), "--resume", cwd=out)
    assert f"resumed from {out / 'checkpoint.pt'} at step 30" in second, second
    assert "weights equal to the uninterrupted run's: yes, bit for bit (8 tensors" in second, second


@pytest.mark.cuda
def test_train_digits_on_one_gpu_in_16_mixed(tmp_path: Path) -> None:
    options = ["--accelerator", "cuda", "--strategy", "auto", "--devices", "1", "--precision", "16-mixed"]
    output = example("train_digits.py", *options, "--out", str(tmp_path), cwd=tmp_path)
    accuracy = float(
        found(r"^held-out accuracy: ([\d.]+) \(359 images; 1 process, SingleDeviceStrategy, 16-mixed", output)
    )
    assert accuracy > 0.9, output
