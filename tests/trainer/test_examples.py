"""The Trainer example in docs/examples/trainer runs as a user runs it and does what it says.

``train_digits.py`` with no arguments is what ``nox -s demo`` and the README run: DDP on 2 CPU processes,
checkpointing on ``val_acc``, early stopping on ``val_loss``, TensorBoard, then ``test(ckpt_path="best")``.
The test reads back everything the script reports: the checkpoint files (loaded with ``weights_only=True``),
the TensorBoard events (with tensorboard's own reader), the data file ``prepare_data`` wrote, and it
recomputes the printed test accuracy from the best checkpoint's weights with a plain model.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
SCRIPT = EXAMPLES / "trainer" / "train_digits.py"
TIMEOUT = 240  # seconds; the default run takes 20-40 s here
STEPS_PER_EPOCH = 20  # 1222 training images over 2 processes, batches of 32

pytestmark = pytest.mark.slow


def run_example(*args: str, cwd: Path) -> str:
    """Runs the script in a clean environment and returns its output; fails the test on a non-zero exit."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TORCHLOOM_")}
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE"):
        environment.pop(name, None)
    environment.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, str(SCRIPT), *args]
    process = subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    output = process.stdout + process.stderr
    assert process.returncode == 0, f"{' '.join(command)} exited with {process.returncode}:\n{output[-8000:]}"
    return output


def found(pattern: str, output: str) -> str:
    match = re.search(pattern, output, re.M)
    assert match is not None, f"no line matching {pattern!r} in:\n{output[-4000:]}"
    return match.group(1)


def shared_digits_module() -> ModuleType:
    """docs/examples/digits.py, imported under its own name (no change to sys.path)."""
    spec = importlib.util.spec_from_file_location("examples_shared_digits", EXAMPLES / "digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def accuracy_as_two_ranks_see_it(weights: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor) -> float:
    """What ``test`` reports: a DistributedSampler (no shuffle) gives rank 0 the even positions and rank 1 the odd
    ones plus the first image again (359 images padded to 2 x 180); the epoch value is the mean over all 360."""
    model = shared_digits_module().DigitsCNN()
    model.load_state_dict({name.removeprefix("network."): value for name, value in weights.items()})
    model.eval()
    order = torch.arange(len(labels))
    shards = [order[0::2], torch.cat([order[1::2], order[:1]])]
    with torch.no_grad():
        correct = sum(int((model(images[s]).argmax(dim=1) == labels[s]).sum()) for s in shards)
    return correct / sum(len(s) for s in shards)


def test_train_digits_with_its_default_settings(tmp_path: Path) -> None:
    output = run_example(cwd=tmp_path)  # no arguments: exactly the README's demo
    out = (tmp_path / "runs" / "trainer-digits").resolve()

    epochs = int(
        found(r"^fit: (\d+) of at most 20 epochs \(.*\) in [\d.]+ s; 2 processes, DDPStrategy, 32-true$", output)
    )
    accuracy = float(found(r"^test accuracy: ([\d.]+) \(the held-out 20%", output))
    assert accuracy > 0.9, output
    assert output.count("test accuracy:") == 1, "only rank 0 reports"
    assert "Epoch 0" in output and "val_acc=" in output, "the progress bar shows the epoch and the prog_bar metrics"

    log_dir = Path(found(r"^logs: (.+)$", output))
    logdir_arg = found(r"^view the logs: \S*tensorboard --logdir (.+) \(then open http://localhost:6006\)$", output)
    assert log_dir == out / "tensorboard" / "version_0" and Path(logdir_arg) == log_dir.parent

    # ModelCheckpoint(monitor="val_acc", mode="max", save_last=True): the best file (top 1) and last.ckpt
    best, last = Path(found(r"^best checkpoint: (.+)$", output)), Path(found(r"^last checkpoint: (.+)$", output))
    assert last == log_dir / "checkpoints" / "last.ckpt" and best.parent == last.parent
    assert sorted(p.name for p in best.parent.iterdir()) == sorted([best.name, "last.ckpt"])
    best_state, last_state = torch.load(best, weights_only=True), torch.load(last, weights_only=True)
    assert best_state["hyper_parameters"] == {"lr": 3e-3, "weight_decay": 1e-4}
    assert (last_state["epoch"], last_state["global_step"]) == (epochs - 1, epochs * STEPS_PER_EPOCH)
    best_epoch, best_val_acc = int(found(r"^epoch=(\d+)-", best.name)), found(r"-val_acc=([\d.]+)\.ckpt$", best.name)
    assert best_state["epoch"] == best_epoch

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    val_acc = [event.value for event in events.Scalars("val_acc")]
    val_loss = [event.value for event in events.Scalars("val_loss")]
    assert len(val_acc) == len(val_loss) == epochs, "validated once per epoch"
    assert val_acc.index(max(val_acc)) == best_epoch and f"{max(val_acc):.4f}" == best_val_acc
    assert [event.step for event in events.Scalars("val_acc")] == [STEPS_PER_EPOCH * (e + 1) for e in range(epochs)]
    assert events.Scalars("test_acc")[-1].value == pytest.approx(accuracy, abs=1e-4)
    if epochs < 20:  # EarlyStopping(monitor="val_loss", patience=3): the last 3 epochs did not beat the best before
        assert "early stopping: val_loss did not improve for 3 epochs" in output
        assert min(val_loss[-3:]) >= min(val_loss[:-3])

    # prepare_data wrote the data once for every process; the printed accuracy is the best checkpoint's
    data = torch.load(out / "data" / "digits.pt", weights_only=True)
    assert sorted(p.name for p in (out / "data").iterdir()) == ["digits.pt"], "no partial file left behind"
    _, test_set = shared_digits_module().split_digits(data["images"], data["labels"], seed=7)
    images, labels = test_set.tensors
    assert len(labels) == 359
    assert accuracy_as_two_ranks_see_it(best_state["state_dict"], images, labels) == pytest.approx(accuracy, abs=1e-4)


@pytest.mark.cuda
def test_train_digits_on_one_gpu_in_16_mixed(tmp_path: Path) -> None:
    options = ["--accelerator", "cuda", "--strategy", "auto", "--devices", "1", "--precision", "16-mixed"]
    output = run_example(*options, "--no-progress-bar", cwd=tmp_path)
    found(r"^fit: (\d+) of at most 20 epochs .* 1 process, SingleDeviceStrategy, 16-mixed$", output)
    assert float(found(r"^test accuracy: ([\d.]+) ", output)) > 0.9, output
