"""Step overhead: one model, data, seed and optimizer trained by plain PyTorch, Fabric and the Trainer.

Paired blocks: every repetition is one process (or one ``world_size``-rank job under torchrun, ``ddp_overhead.py``)
that trains all variants in rounds. A round trains each variant for a short block of steps (a fresh model,
optimizer and Fabric/Trainer each time), in an order that rotates from round to round; a variant's ratio in a
round is its median step time over plain PyTorch's median in the same round, and the reported ratio is the
median over all rounds of all repetitions. Comparing within a round cancels what drifts more slowly than a
round (another process on the machine, CPU clocks), which on a shared 2-core VM is larger than the overhead
being measured. A step is the time between consecutive batch starts (``time.perf_counter``, and process CPU
time), after each block's warm-up. The launch, memory and GPU benchmarks run one variant per job
(``child`` with a plain variant name).
"""

from __future__ import annotations

import datetime
import gc
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
    "large": Workload("large", features=256, hidden=512, batch_size=128, steps=96),  # compute dominates
}
ROUNDS = 8  # blocks per variant per repetition; a block is steps // ROUNDS timed steps
BLOCK_WARMUP = 5  # untimed steps at the start of each block
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
    """Train every configuration of the job; each rank writes its step times and peak RSS.

    ``job.variant == "paired"``: all of ``job.extra["variants"]`` in rotating rounds of blocks (see the module's
    docstring); otherwise that one variant, once per configuration.
    """
    import torch

    torch.set_num_threads(1)
    job = load_job(job_path)
    results = []
    if job.variant == "paired":
        plain_process(job.device, distributed=job.world_size > 1)  # first, so no variant owns (and ends) the group
    for config in job.configs:
        work = Workload(**config["workload"])
        if job.variant == "paired":
            rounds = _paired_rounds(work, config, job)
            results.append({"workload": work.name, "precision": config["precision"], "rounds": rounds})
            continue
        batches = job.warmup + config["steps"] + 1
        clock = StepClock(job.device, job.first_step_file if rank() == 0 else None)
        TRAIN[job.variant](work, config["precision"], batches, clock, job)
        results.append({"workload": work.name, "precision": config["precision"], **clock.steps(job.warmup)})
    if torch.distributed.is_initialized():
        gc.collect()  # DDP wrappers sit in reference cycles; freed at exit, their group's destructor can abort
        torch.distributed.destroy_process_group()
    write_report(job, {"results": results})


def _paired_rounds(work: Workload, config: dict[str, Any], job: Job) -> list[dict[str, dict[str, list[float]]]]:
    """Per round, per variant: the step times of one block. The order rotates so none always runs first."""
    variants: list[str] = job.extra["variants"]
    rounds = []
    for index in range(job.extra["rounds"]):
        order = variants[index % len(variants) :] + variants[: index % len(variants)]
        blocks = {}
        for variant in order:
            clock = StepClock(job.device)
            TRAIN[variant](work, config["precision"], job.warmup + config["steps"] + 1, clock, job)
            blocks[variant] = clock.steps(job.warmup)
        rounds.append(blocks)
    return rounds


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
    """Paired rounds in ``repetitions`` jobs; one row per variant x workload x precision (rank 0's steps).

    The row's ratio is the median of the per-round ratios to plain PyTorch, its spread their IQR (as a ratio);
    the median and CPU ratio pool every timed step. ``quick`` (a check that the suite runs, not a measurement)
    leaves out the A/A repeat of the plain loop and runs 1 round of 2 steps after 1 warm-up step (the rotation
    of the order over rounds is checked by a unit test; every variant, workload and precision still trains).
    """
    if quick:
        variants = tuple(variant for variant in variants if variant != "plain-again")
    rounds = 1 if quick else ROUNDS
    configs = [
        {"workload": asdict(work), "precision": precision, "steps": 2 if quick else max(work.steps // rounds, 3)}
        for work in WORKLOADS.values()
        for precision in precisions
    ]
    extra = {"variants": list(variants), "rounds": rounds}
    wall: dict[tuple[str, str, str], list[float]] = {}
    cpu: dict[tuple[str, str, str], list[float]] = {}
    ratios: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for rep in range(repetitions):
            out = str(Path(scratch, f"paired-{rep}"))
            job = Job("paired", configs, 1 if quick else BLOCK_WARMUP, out, world_size, device, extra=extra)
            for result in run_job(job, "tools.bench.step_overhead")[0]["results"]:
                for blocks in result["rounds"]:
                    plain = median(blocks["plain"]["wall"])
                    for variant, steps in blocks.items():
                        key = (variant, result["workload"], result["precision"])
                        wall.setdefault(key, []).extend(steps["wall"])
                        cpu.setdefault(key, []).extend(steps["cpu"])
                        ratios.setdefault(key, []).append(median(steps["wall"]) / plain)
    rows = []
    for work in WORKLOADS:
        for precision in precisions:
            plain_cpu = median(cpu["plain", work, precision])
            for variant in variants:
                key = (variant, work, precision)
                ratio = median(ratios[key])
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
                        ratio_spread=iqr(ratios[key]),
                    )
                )
    return rows


def run_step_overhead(repetitions: int, quick: bool) -> list[Row]:
    """Single process on the CPU, both workloads and precisions."""
    return measure_steps("step", repetitions, quick)


if __name__ == "__main__":
    child(sys.argv[1])
