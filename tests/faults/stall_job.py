"""A 2-rank DDP job (``python stall_job.py PRODUCT SCENARIO``, re-run as 2 workers) for the stall watchdog tests.

PRODUCT: ``fabric`` (a hand-written loop) or ``trainer``. SCENARIO, at step ``STALL_STEP``:
``stall``: rank 1 sleeps for an hour before its backward (Fabric) / inside training_step (Trainer);
``slow``: both ranks sleep ``SLOW_S``, longer than the stall timeout (no stall: nobody waits for anybody);
``off``: ``stall_timeout=None``, no sleep. The Trainer's ``slow`` job fits again with ``off`` afterwards, in the
same workers (a launch spared). Workers print ``WATCHDOG rank=R threads=N`` (the watchdog threads
alive at the first step) and ``DONE scenario=S rank=R threads_after=N`` after each run.
"""

from __future__ import annotations

import datetime
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchloom.core.strategies.ddp import DDPStrategy

STALL_TIMEOUT = datetime.timedelta(seconds=3)
STALL_STEP = 3
STEPS = 6
SLOW_S = 5.0


def watchdog_threads() -> int:
    return sum(thread.name == "torchloom-stall-watchdog" for thread in threading.enumerate())


def act(scenario: str, step: int, rank: int) -> None:
    """Reports the watchdog at the first step; stalls or slows down at ``STALL_STEP`` as the scenario says."""
    if step == 0:
        print(f"WATCHDOG scenario={scenario} rank={rank} threads={watchdog_threads()}", flush=True)
    if step != STALL_STEP:
        return
    if scenario == "stall" and rank == 1:
        print("STALLING rank=1", flush=True)
        time.sleep(3600)  # the stall: this rank never reaches its next strategy call
    if scenario == "slow":
        time.sleep(SLOW_S)


def strategy(scenario: str) -> DDPStrategy:
    stall_timeout = None if scenario == "off" else STALL_TIMEOUT
    return DDPStrategy(timeout=datetime.timedelta(seconds=120), stall_timeout=stall_timeout)


def run_fabric(scenario: str) -> int:
    from torchloom.fabric import Fabric  # only the product under test: each launch imports less

    fabric = Fabric(accelerator="cpu", strategy=strategy(scenario), devices=2)
    fabric.launch()
    torch.manual_seed(0)
    layer = nn.Linear(4, 1)
    model, optimizer = fabric.setup(layer, torch.optim.SGD(layer.parameters(), lr=0.1))
    for step in range(STEPS):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        act(scenario, step, fabric.global_rank)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return fabric.global_rank


def run_trainer(scenario: str) -> int:
    from torchloom.trainer import LoomModule, Trainer

    class Regressor(LoomModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            act(scenario, self.trainer.global_step, self.trainer.global_rank)
            (x,) = batch
            return self.layer(x).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy(scenario), max_steps=STEPS, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                      num_sanity_val_steps=0)  # fmt: skip
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)
    trainer.fit(Regressor(), data)
    return trainer.global_rank


if __name__ == "__main__":
    product, scenario = sys.argv[1], sys.argv[2]
    for run in [scenario, "off"] if (product, scenario) == ("trainer", "slow") else [scenario]:
        rank = run_fabric(run) if product == "fabric" else run_trainer(run)
        print(f"DONE scenario={run} rank={rank} threads_after={watchdog_threads()}", flush=True)
