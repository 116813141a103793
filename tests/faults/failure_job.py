"""A 2-rank DDP job on the CPU in which rank 1 fails: ``failure_job.py PRODUCT POINT MODE LAUNCHER OUT``.

PRODUCT: ``fabric`` (the user's own loop) or ``trainer`` (a LoomModule). POINT: where rank 1 fails, one of
``POINTS``. MODE: ``raise`` (a RuntimeError "injected failure at POINT on rank 1") or ``kill`` (SIGKILL to itself).
LAUNCHER: ``popen`` (strategy "ddp": this script re-runs itself as the workers), ``spawn`` (strategy "ddp_spawn")
or ``torchrun`` (strategy "ddp" in workers an external ``python -m torch.distributed.run`` started). OUT: a folder
for the checkpoint. Just before failing, rank 1 prints ``INJECT <time.time()>`` to stdout.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchloom.fabric import Fabric
from torchloom.trainer import LoomModule, Trainer
from torchloom.trainer.callbacks import ModelCheckpoint

POINTS = ("setup", "forward", "backward", "collective", "checkpoint", "validation")
STRATEGIES = {"popen": "ddp", "spawn": "ddp_spawn", "torchrun": "ddp"}
FAIL_STEP = 2  # forward, backward and the collective fail at this training step; the others where they happen once


class Injector:
    """Fails rank 1 at ``point`` (and, for the per-step points, at ``FAIL_STEP``)."""

    def __init__(self, point: str, mode: str) -> None:
        self.point, self.mode, self.rank, self.step = point, mode, -1, 0

    def at(self, point: str) -> None:
        per_step = point in ("forward", "backward", "collective")
        if point != self.point or self.rank != 1 or (per_step and self.step != FAIL_STEP):
            return
        print(f"INJECT {time.time():.3f}", flush=True)
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure at {point} on rank 1")


class Net(nn.Module):
    def __init__(self, injector: Injector) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)
        self.injector = injector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.injector.at("forward")
        out = self.layer(x)
        if out.requires_grad and self.injector.point == "backward":
            out.register_hook(lambda grad: self.injector.at("backward"))  # raises inside autograd's backward pass
        return out


def data() -> DataLoader[Any]:
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2)


# --------------------------------------------------------------- Fabric: the user's loop


class Probe:
    """Saved with the Fabric checkpoint: rank 1 fails while ``save`` collects the state dicts."""

    def __init__(self, injector: Injector) -> None:
        self.injector = injector

    def state_dict(self) -> dict[str, Any]:
        self.injector.at("checkpoint")
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def fabric_loop(fabric: Fabric, injector: Injector, out: str) -> None:
    injector.rank = fabric.global_rank
    injector.at("setup")
    net = Net(injector)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    train, val = fabric.setup_dataloaders(data(), data())
    for step, (x, y) in enumerate(train):
        injector.step = step
        loss = nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        injector.at("collective")
        fabric.all_reduce(loss.detach())
        if step == FAIL_STEP:
            fabric.save(Path(out, "fabric.ckpt"), {"model": model, "optimizer": optimizer, "probe": Probe(injector)})
    total = torch.zeros(())
    with torch.no_grad():
        for x, y in val:
            injector.at("validation")
            total += nn.functional.mse_loss(model(x), y)
    fabric.all_reduce(total)


def run_fabric(point: str, mode: str, launcher: str, out: str) -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy=STRATEGIES[launcher])
    fabric.launch(fabric_loop, Injector(point, mode), out)


# --------------------------------------------------------------- Trainer: a LoomModule


class FailingModule(LoomModule):
    def __init__(self, injector: Injector) -> None:
        super().__init__()
        self.injector = injector
        self.net = Net(injector)

    def setup(self, stage: str) -> None:
        self.injector.rank = self.trainer.global_rank
        self.injector.at("setup")

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.injector.step = self.trainer.global_step
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.injector.at("collective")
        self.all_gather(loss.detach())
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.injector.at("checkpoint")

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        self.injector.at("validation")
        self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]), sync_dist=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run_trainer(point: str, mode: str, launcher: str, out: str) -> None:
    checkpoint = ModelCheckpoint(dirpath=out, every_n_train_steps=FAIL_STEP)
    trainer = Trainer(accelerator="cpu", devices=2, strategy=STRATEGIES[launcher], max_epochs=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[checkpoint], default_root_dir=out)  # fmt: skip
    trainer.fit(FailingModule(Injector(point, mode)), data(), data())


if __name__ == "__main__":
    product, point, mode, launcher, out = sys.argv[1:6]
    (run_fabric if product == "fabric" else run_trainer)(point, mode, launcher, out)
    print("JOB ENDED WITHOUT FAILING", flush=True)
