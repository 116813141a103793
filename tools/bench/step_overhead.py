"""Step overhead: one model, data, seed and optimizer trained by plain PyTorch, Fabric and the Trainer.

The runner starts one child per variant and repetition, in turn (plain, plain again, Fabric, Trainer, plain, ...),
all with the same environment. A child (``python -m tools.bench.step_overhead JOB.json``) trains every
workload x precision with its variant and writes, per configuration, the wall (``time.perf_counter``) and
process CPU (``time.process_time``) time of each step after warm-up: the time between consecutive batch starts.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.bench.common import Row, iqr, median, run_python, verdict

__all__ = ["PRECISIONS", "VARIANTS", "WORKLOADS", "Workload", "run_step_overhead"]


@dataclass(frozen=True)
class Workload:
    name: str
    features: int
    hidden: int
    batch_size: int
    steps: int  # timed steps (the full configuration)


WORKLOADS = {
    "small": Workload("small", features=32, hidden=64, batch_size=32, steps=400),  # Python overhead dominates
    "large": Workload("large", features=256, hidden=512, batch_size=128, steps=60),  # compute dominates
}
PRECISIONS = ("32-true", "bf16-mixed")
# "plain-again" is the A/A row: the same plain loop, whose ratio to plain is the noise floor of the run.
VARIANTS = ("plain", "plain-again", "fabric", "trainer")
TARGETS = {("fabric", "small"): 1.03, ("fabric", "large"): 1.01, ("trainer", "small"): 1.08, ("trainer", "large"): 1.03}
SEED = 1234


class StepClock:
    """Timestamps at each batch start; the differences after the warm-up are the step times."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def steps(self, warmup: int) -> dict[str, list[float]]:
        def diffs(stamps: list[float]) -> list[float]:
            return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]

        return {"wall": diffs(self.wall), "cpu": diffs(self.cpu)}


def _model_and_data(work: Workload, batches: int) -> tuple[Any, Any, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(SEED)
    model = torch.nn.Sequential(
        torch.nn.Linear(work.features, work.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(work.hidden, work.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(work.hidden, 10),
    )
    inputs = torch.randn(batches * work.batch_size, work.features)
    labels = torch.randint(0, 10, (batches * work.batch_size,))
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=work.batch_size, shuffle=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, optimizer, loader


def _train_plain(work: Workload, precision: str, batches: int, clock: StepClock) -> None:
    import torch
    import torch.nn.functional as F

    model, optimizer, loader = _model_and_data(work, batches)
    bf16 = precision == "bf16-mixed"
    model.train()
    for inputs, labels in loader:
        clock.tick()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()


def _train_fabric(work: Workload, precision: str, batches: int, clock: StepClock) -> None:
    import torch.nn.functional as F

    from torchloom.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    model, optimizer, loader = _model_and_data(work, batches)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(loader)
    model.train()
    for inputs, labels in loader:
        clock.tick()
        loss = F.cross_entropy(model(inputs).float(), labels)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()


def _train_trainer(work: Workload, precision: str, batches: int, clock: StepClock, log_dir: str) -> None:
    import torch
    import torch.nn.functional as F

    from torchloom.core.loggers import CSVLogger
    from torchloom.trainer import LoomModule, Trainer
    from torchloom.trainer.callbacks import Callback

    network, optimizer, loader = _model_and_data(work, batches)

    class Classifier(LoomModule):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            inputs, labels = batch
            loss = F.cross_entropy(self.network(inputs).float(), labels)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return optimizer  # type: ignore[no-any-return]

    class Clock(Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            clock.tick()

    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        max_steps=batches,
        logger=CSVLogger(log_dir, name="bench"),
        log_every_n_steps=50,
        callbacks=[Clock()],
        enable_progress_bar=True,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=log_dir,
    )
    trainer.fit(Classifier(), train_dataloaders=loader)


def _child(job_path: str) -> None:
    """Train every configuration of the job with one variant; write the step times next to the job file."""
    import torch

    torch.set_num_threads(1)
    job = json.loads(Path(job_path).read_text())
    results = []
    for config in job["configs"]:
        work = Workload(**config["workload"])
        batches = job["warmup"] + config["steps"] + 1
        clock = StepClock()
        variant = job["variant"]
        if variant in ("plain", "plain-again"):
            _train_plain(work, config["precision"], batches, clock)
        elif variant == "fabric":
            _train_fabric(work, config["precision"], batches, clock)
        else:
            with tempfile.TemporaryDirectory() as log_dir:
                _train_trainer(work, config["precision"], batches, clock, log_dir)
        results.append({"workload": work.name, "precision": config["precision"], **clock.steps(job["warmup"])})
    Path(job["out"]).write_text(json.dumps(results))


def run_step_overhead(repetitions: int, quick: bool) -> list[Row]:
    """Interleave the variants over the repetitions; one row per variant x workload x precision."""
    configs = [
        {"workload": vars(work), "precision": precision, "steps": 3 if quick else work.steps}
        for work in WORKLOADS.values()
        for precision in PRECISIONS
    ]
    warmup = 2 if quick else 10
    wall: dict[tuple[str, str, str], list[float]] = {}
    cpu: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for rep in range(repetitions):
            for variant in VARIANTS:
                job, out = Path(scratch, f"{variant}-{rep}.json"), Path(scratch, f"{variant}-{rep}.out.json")
                job.write_text(json.dumps({"variant": variant, "configs": configs, "warmup": warmup, "out": str(out)}))
                run_python(["-m", "tools.bench.step_overhead", str(job)], timeout=1800)
                for result in json.loads(out.read_text()):
                    key = (variant, result["workload"], result["precision"])
                    wall.setdefault(key, []).extend(result["wall"])
                    cpu.setdefault(key, []).extend(result["cpu"])
    rows = []
    for work in WORKLOADS:
        for precision in PRECISIONS:
            plain_wall, plain_cpu = median(wall["plain", work, precision]), median(cpu["plain", work, precision])
            for variant in VARIANTS:
                key = (variant, work, precision)
                ratio = median(wall[key]) / plain_wall
                target = TARGETS.get((variant, work))
                rows.append(
                    Row(
                        "step",
                        f"{variant} {work} {precision}",
                        median(wall[key]),
                        iqr(wall[key]),
                        ratio,
                        target,
                        verdict(ratio, target),
                        cpu_median=median(cpu[key]),
                        cpu_ratio=median(cpu[key]) / plain_cpu if plain_cpu > 0 else float("nan"),
                    )
                )
    return rows


if __name__ == "__main__":
    _child(sys.argv[1])
