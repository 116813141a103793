"""Step overhead: one model, data, seed and optimizer trained by plain PyTorch, Fabric and the Trainer.

The runner starts one job per variant and repetition, in turn (plain, plain again, Fabric, Trainer, plain, ...),
all with the same environment: one process, or ``world_size`` ranks under torchrun (``ddp_overhead.py``). A job
(``python -m tools.bench.step_overhead JOB.json``) trains every workload x precision with its variant; each rank
writes, per configuration, the wall (``time.perf_counter``) and process CPU (``time.process_time``) time of each
step after warm-up (the time between consecutive batch starts), and its peak RSS at the end. The launch, memory
and GPU benchmarks run the same jobs.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tools.bench.common import Job, Row, iqr, load_job, median, rank, run_job, verdict, write_report

__all__ = [
    "PRECISIONS",
    "SEED",
    "VARIANTS",
    "WORKLOADS",
    "StepClock",
    "Workload",
    "child",
    "measure_steps",
    "plain_process",
    "run_step_overhead",
]


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
PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=60)


class StepClock:
    """Timestamps at each batch start; the differences after the warm-up are the step times."""

    def __init__(self, device: str = "cpu", first_step_file: str | None = None) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.first_step_file = first_step_file
        self._synchronize: Any = None
        if device == "cuda":  # a step ends when the GPU is done, not when the launches are queued
            import torch

            self._synchronize = torch.cuda.synchronize

    def tick(self) -> None:
        if self._synchronize is not None:
            self._synchronize()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def step_end(self) -> None:
        if self.first_step_file is not None:
            Path(self.first_step_file).write_text(repr(time.time()))
            self.first_step_file = None

    def steps(self, warmup: int) -> dict[str, list[float]]:
        def diffs(stamps: list[float]) -> list[float]:
            return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]

        return {"wall": diffs(self.wall), "cpu": diffs(self.cpu)}


def _model_and_data(work: Workload, batches: int, world_size: int, own_sampler: bool) -> tuple[Any, Any, Any]:
    """``batches`` batches per rank; ``own_sampler`` gives each rank its share (Fabric and the Trainer do it)."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    torch.manual_seed(SEED)
    model = torch.nn.Sequential(
        torch.nn.Linear(work.features, work.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(work.hidden, work.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(work.hidden, 10),
    )
    samples = batches * work.batch_size * world_size
    data = TensorDataset(torch.randn(samples, work.features), torch.randint(0, 10, (samples,)))
    sampler: DistributedSampler[Any] | None = None
    if own_sampler and world_size > 1:
        sampler = DistributedSampler(data, world_size, rank(), shuffle=False)
    loader = DataLoader(data, batch_size=work.batch_size, shuffle=False, sampler=sampler)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, optimizer, loader


def plain_process(device_type: str, distributed: bool) -> Any:
    """What a plain script does first: pick this rank's device; with ``distributed``, join the process group.

    The group comes from torchrun's variables (``env://``); nccl on GPUs, gloo on the CPU.
    """
    import torch

    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if distributed and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
    return device


def _train_plain(work: Workload, precision: str, batches: int, clock: StepClock, job: Job) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    device = plain_process(job.device, distributed=job.world_size > 1)
    model, optimizer, loader = _model_and_data(work, batches, job.world_size, own_sampler=True)
    model.to(device)
    if job.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    bf16 = precision == "bf16-mixed"
    model.train()
    for inputs, labels in loader:
        clock.tick()
        inputs, labels = inputs.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        clock.step_end()


def _train_fabric(work: Workload, precision: str, batches: int, clock: StepClock, job: Job) -> None:
    import torch.nn.functional as F

    from torchloom.fabric import Fabric

    strategy = "ddp" if job.world_size > 1 else "auto"
    fabric = Fabric(accelerator=job.device, strategy=strategy, devices=job.world_size, precision=precision)
    fabric.launch()
    model, optimizer, loader = _model_and_data(work, batches, job.world_size, own_sampler=False)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(loader)
    model.train()
    for inputs, labels in loader:
        clock.tick()
        loss = F.cross_entropy(model(inputs).float(), labels)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        clock.step_end()


def _train_trainer(work: Workload, precision: str, batches: int, clock: StepClock, job: Job) -> None:
    import torch
    import torch.nn.functional as F

    from torchloom.core.loggers import CSVLogger
    from torchloom.trainer import LoomModule, Trainer
    from torchloom.trainer.callbacks import Callback

    network, optimizer, loader = _model_and_data(work, batches, job.world_size, own_sampler=False)

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

    class ClockAndFirstStep(Clock):  # only when asked: one more hook per step is overhead a user would not have
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            clock.step_end()

    with tempfile.TemporaryDirectory() as log_dir:
        trainer = Trainer(
            accelerator=job.device,
            strategy="ddp" if job.world_size > 1 else "auto",
            devices=job.world_size,
            precision=precision,
            max_epochs=1,
            max_steps=batches,
            logger=CSVLogger(log_dir, name="bench"),
            log_every_n_steps=50,
            callbacks=[ClockAndFirstStep() if clock.first_step_file else Clock()],
            enable_progress_bar=True,
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=log_dir,
        )
        trainer.fit(Classifier(), train_dataloaders=loader)


TRAIN = {"plain": _train_plain, "plain-again": _train_plain, "fabric": _train_fabric, "trainer": _train_trainer}


def child(job_path: str) -> None:
    """Train every configuration of the job with one variant; each rank writes its step times and peak RSS."""
    import torch

    torch.set_num_threads(1)
    job = load_job(job_path)
    results = []
    for config in job.configs:
        work = Workload(**config["workload"])
        batches = job.warmup + config["steps"] + 1
        clock = StepClock(job.device, job.first_step_file if rank() == 0 else None)
        TRAIN[job.variant](work, config["precision"], batches, clock, job)
        results.append({"workload": work.name, "precision": config["precision"], **clock.steps(job.warmup)})
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    write_report(job, {"results": results})


def measure_steps(
    kind: str,
    repetitions: int,
    quick: bool,
    *,
    world_size: int = 1,
    device: str = "cpu",
    precisions: tuple[str, ...] = PRECISIONS,
    variants: tuple[str, ...] = VARIANTS,
) -> list[Row]:
    """Interleave the variants over the repetitions; one row per variant x workload x precision (rank 0's steps).

    ``quick`` (a check that the suite runs, not a measurement) leaves out the A/A repeat of the plain loop.
    """
    if quick:
        variants = tuple(variant for variant in variants if variant != "plain-again")
    configs = [
        {"workload": asdict(work), "precision": precision, "steps": 3 if quick else work.steps}
        for work in WORKLOADS.values()
        for precision in precisions
    ]
    wall: dict[tuple[str, str, str], list[float]] = {}
    cpu: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for rep in range(repetitions):
            for variant in variants:
                out = str(Path(scratch, f"{variant}-{rep}"))
                job = Job(variant, configs, 2 if quick else 10, out, world_size=world_size, device=device)
                for result in run_job(job, "tools.bench.step_overhead")[0]["results"]:
                    key = (variant, result["workload"], result["precision"])
                    wall.setdefault(key, []).extend(result["wall"])
                    cpu.setdefault(key, []).extend(result["cpu"])
    rows = []
    for work in WORKLOADS:
        for precision in precisions:
            plain_wall, plain_cpu = median(wall["plain", work, precision]), median(cpu["plain", work, precision])
            for variant in variants:
                key = (variant, work, precision)
                ratio = median(wall[key]) / plain_wall
                target = TARGETS.get((variant, work))
                rows.append(
                    Row(
                        kind,
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


def run_step_overhead(repetitions: int, quick: bool) -> list[Row]:
    """Single process on the CPU, both workloads and precisions."""
    return measure_steps("step", repetitions, quick)


if __name__ == "__main__":
    child(sys.argv[1])
