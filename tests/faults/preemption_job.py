"""Two DDP ranks on the CPU that get preempted (``python preemption_job.py MODE OUT``; the ranks re-run it).

Modes (each phase writes ``OUT/<phase>-rank<R>.json``; rank 0 also the weights, ``OUT/<phase>.pt``):

- ``trainer-self``: rank 1 sends itself SIGUSR1 at global step 5 ("first"), then the same processes resume
  with ``fit(ckpt_path="last")`` ("resumed") and train a reference run that is never stopped. Started as two
  srun tasks by the test.
- ``trainer-wait``: slow steps; the test sends SIGTERM to this (launching) process ("first").
- ``spawn-wait``: as ``trainer-wait`` under ``ddp_spawn``; this process writes ``OUT/parent.json``.
- ``fabric``: the same story with a hand-written Fabric loop and ``Preemption``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import nn

from tests.faults.test_preemption import QUIET, Net, loader
from torchloom.fabric import Fabric, Preemption
from torchloom.trainer import Trainer


def record(out: Path, phase: str, rank: int, weights: dict[str, Any], **facts: Any) -> None:
    (out / f"{phase}-rank{rank}.json").write_text(json.dumps({**facts, "pid": os.getpid()}))
    if rank == 0:
        torch.save(weights, out / f"{phase}.pt")


def fit(out: Path, phase: str, module: Net, strategy: str = "ddp", **kwargs: Any) -> None:
    root = out / ("reference" if phase == "reference" else "run")
    trainer = Trainer(devices=2, strategy=strategy, default_root_dir=root, **QUIET)
    trainer.fit(module, loader(), **kwargs)
    facts = {"preempted": trainer.state.preempted, "global_step": trainer.global_step}
    if strategy == "ddp_spawn":
        (out / "parent.json").write_text(json.dumps(facts))
    else:
        record(out, phase, trainer.global_rank, module.state_dict(), **facts)


def fabric_run(fabric: Fabric, out: Path, signal_at: int = -1, resume: bool = False) -> dict[str, Any]:
    """24 steps of a linear model; batches depend on (rank, step) only, so a resumed loop sees the same ones."""
    torch.manual_seed(0)
    module = nn.Linear(4, 1)
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9))
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
    path = out / "fabric.ckpt"
    if resume:
        fabric.load(path, state)
    stopped = False
    with Preemption(fabric) as preemption:
        for step in range(state["step"], 24):
            if step == signal_at and fabric.global_rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            generator = torch.Generator().manual_seed(1000 * fabric.global_rank + step)
            x = torch.randn(8, 4, generator=generator)
            loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            state["step"] = step + 1
            if preemption.requested():
                fabric.save(path, state)
                preemption.requeue()
                stopped = True
                break
    return {"rank": fabric.global_rank, "step": state["step"], "stopped": stopped, "weights": model.state_dict()}


def main(mode: str, out: Path) -> None:
    if mode == "trainer-self":
        fit(out, "first", Net(signal_at=5, signal_name="SIGUSR1", signal_rank=1))
        fit(out, "resumed", Net(), ckpt_path="last")
        fit(out, "reference", Net())
    elif mode == "trainer-wait":
        fit(out, "first", Net(step_seconds=0.3, marker=str(out / "training")))
    elif mode == "spawn-wait":
        fit(out, "first", Net(step_seconds=0.3, marker=str(out / "training")), strategy="ddp_spawn")
    elif mode == "fabric":
        fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
        fabric.launch()  # here the launching process becomes the agent of two workers that re-run this script
        for phase, kwargs in (("first", {"signal_at": 5}), ("resumed", {"resume": True}), ("reference", {})):
            run = fabric_run(fabric, out, **kwargs)
            record(out, phase, run.pop("rank"), run.pop("weights"), **run)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
