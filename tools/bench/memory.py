"""Peak memory per rank: plain PyTorch vs Fabric vs the Trainer, and DDP vs FSDP.

Each process reports its own peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) after training the
larger workload of ``step_overhead.py`` for N steps in 32-true (every child with ``MEMORY_ENV``: freed large
blocks go back to the system, so the peak is what was live, not heap fragmentation), with that file's training code: one process, and
2-rank DDP under torchrun (a job counts as the largest of its ranks). Fresh processes, interleaved
(plain, Fabric, Trainer, plain, ...), medians over repetitions. Target: at most 5% above plain PyTorch.

Sharding: Fabric(strategy="ddp") against Fabric(strategy="fsdp", one unit per layer) on 2 ranks, both built in
``fabric.init_module(empty_init=True)`` (meta device under FSDP), training 8 x Linear(2048, 2048)
(128 MiB of fp32 weights, as much again in gradients and twice that in Adam state) for a few steps; an "info"
row with the FSDP/DDP ratio. Skipped, with a message, while no strategy is registered as "fsdp".
"""

from __future__ import annotations

import gc
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tools.bench.common import MEMORY_ENV, Job, Row, fsdp_available, load_job, ratio_rows, run_job, write_report
from tools.bench.step_overhead import SEED, WORKLOADS

__all__ = ["SHARDED_MODEL", "run_memory"]

WORLD_SIZE = 2
VARIANTS = ("plain", "fabric", "trainer")
TARGET = 1.05
SHARDED_MODEL = {"width": 2048, "layers": 8, "batch_size": 16}
QUICK_SHARDED_MODEL = {"width": 256, "layers": 2, "batch_size": 4}
SHARDING_STRATEGIES = ("ddp", "fsdp")


def _peak(job: Job, module: str = "tools.bench.step_overhead") -> float:
    return float(max(report["max_rss"] for report in run_job(job, module, env=MEMORY_ENV)))


def _training_rows(repetitions: int, quick: bool, scratch: str) -> list[Row]:
    config = {"workload": asdict(WORKLOADS["large"]), "precision": "32-true", "steps": 3 if quick else 100}
    rows = []
    # quick leaves out the 2-rank jobs: the ddp section runs these, and the sharding rows this file's 2-rank path
    layouts = [(1, "single")] if quick else [(1, "single"), (WORLD_SIZE, f"ddp x{WORLD_SIZE}")]
    for world_size, label in layouts:
        peaks: dict[str, list[float]] = {f"{label} {variant}": [] for variant in VARIANTS}
        for rep in range(repetitions):
            for variant in VARIANTS:
                out = str(Path(scratch, f"{variant}-{world_size}-{rep}"))
                peaks[f"{label} {variant}"].append(_peak(Job(variant, [config], 1, out, world_size=world_size)))
        targets = {f"{label} {variant}": TARGET for variant in VARIANTS if variant != "plain"}
        rows += ratio_rows("memory", peaks, f"{label} plain", targets, unit="B")
    return rows


def _sharding_rows(repetitions: int, quick: bool, scratch: str) -> list[Row]:
    if not fsdp_available():
        print("memory: DDP vs FSDP skipped: FSDP not available yet", flush=True)
        return []
    extra = {**(QUICK_SHARDED_MODEL if quick else SHARDED_MODEL), "steps": 1 if quick else 3}
    peaks: dict[str, list[float]] = {f"fabric {name} x{WORLD_SIZE}": [] for name in SHARDING_STRATEGIES}
    for rep in range(repetitions):
        for name in SHARDING_STRATEGIES:
            out = str(Path(scratch, f"sharded-{name}-{rep}"))
            job = Job(name, [], 0, out, world_size=WORLD_SIZE, extra=extra)
            peaks[f"fabric {name} x{WORLD_SIZE}"].append(_peak(job, "tools.bench.memory"))
    return ratio_rows("memory", peaks, f"fabric ddp x{WORLD_SIZE}", {}, unit="B")


def run_memory(repetitions: int, quick: bool) -> list[Row]:
    with tempfile.TemporaryDirectory() as scratch:
        return _training_rows(repetitions, quick, scratch) + _sharding_rows(repetitions, quick, scratch)


def sharding_child(job_path: str) -> None:
    """One rank of the DDP-vs-FSDP job: Fabric with ``job.variant`` as the strategy; writes its peak RSS."""
    import torch

    from torchloom.core.registry import STRATEGIES
    from torchloom.fabric import Fabric

    torch.set_num_threads(1)
    job = load_job(job_path)
    strategy: Any = job.variant
    if job.variant == "fsdp":  # each layer its own unit: one layer's weights gathered at a time
        strategy = STRATEGIES.get("fsdp", auto_wrap_policy={torch.nn.Linear})
    fabric = Fabric(accelerator="cpu", strategy=strategy, devices=job.world_size)
    fabric.launch()
    torch.manual_seed(SEED)
    width = job.extra["width"]
    with fabric.init_module(empty_init=True):  # FSDP: on the meta device, so no rank holds the whole model
        layers = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(job.extra["layers"])))
    model = fabric.setup_module(layers)
    optimizer = fabric.setup_optimizers(torch.optim.Adam(model.parameters(), lr=1e-4))
    inputs = torch.randn(job.extra["batch_size"], width, device=fabric.device)
    for _ in range(job.extra["steps"]):
        loss = model(inputs).square().mean()
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
    del model, optimizer  # a DDP reducer must not outlive the group it holds (gloo's destructor can deadlock)
    gc.collect()  # they sit in reference cycles
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    write_report(job, {})


if __name__ == "__main__":
    sharding_child(sys.argv[1])
