"""A 2-rank DDP Trainer fit for ``torchloom run``: ``restart_job.py OUT CRASH_STEP MODE [FOLDERS]``.

Rank 1 crashes at global step CRASH_STEP (-1: never) on the first attempt only (``TORCHELASTIC_RESTART_COUNT``
0), by raising (MODE ``raise``) or ``os._exit(3)`` (MODE ``exit``). ModelCheckpoint saves ``last.ckpt`` every 3
steps. Each attempt appends ``attempt=<restart count> rank=<rank> start_step=<global step at train start>`` to
``OUT/starts.txt``; rank 0 saves the final weights to ``OUT/final.pt``. FOLDERS ``fixed`` (default): no logger, the
checkpoints in ``OUT/checkpoints``; ``default``: the default logger and ModelCheckpoint folder (``OUT/torchloom_logs/
version_N/checkpoints``, a new N for each attempt)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchloom.trainer import LoomModule, Trainer
from torchloom.trainer.callbacks import ModelCheckpoint


class Regressor(LoomModule):
    def __init__(self, out: Path, crash_step: int, mode: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 1)
        self.out, self.crash_step, self.mode = out, crash_step, mode

    def on_train_start(self) -> None:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "?")
        with open(self.out / "starts.txt", "a") as file:
            file.write(f"attempt={attempt} rank={self.trainer.global_rank} start_step={self.trainer.global_step}\n")

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
        if first_attempt and self.trainer.global_rank == 1 and self.trainer.global_step == self.crash_step:
            if self.mode == "exit":
                os._exit(3)
            raise RuntimeError(f"injected crash at step {self.crash_step} on rank 1")
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main(out: Path, crash_step: int, mode: str, folders: str) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=generator)
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4, shuffle=True)
    dirpath = out / "checkpoints" if folders == "fixed" else None
    checkpoints = ModelCheckpoint(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=3)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, logger=folders != "fixed",
                      default_root_dir=out, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[checkpoints])  # fmt: skip
    module = Regressor(out, crash_step, mode)
    trainer.fit(module, data)  # no ckpt_path: a restarted attempt resumes from last.ckpt by itself
    if trainer.is_global_zero:
        torch.save({name: tensor.detach().clone() for name, tensor in module.state_dict().items()}, out / "final.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "fixed")
