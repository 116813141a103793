"""Saves a checkpoint over and over until it is killed (``python killed_save_job.py KIND OUT``): the test SIGKILLs it
at a random moment, most likely in the middle of a save, and checks what is left at ``OUT/last.ckpt``.

KIND ``file``: one process, ``fabric.save`` of a single file. KIND ``sharded``: ``fsdp`` on one CPU device, a DCP
directory. Every save ``i`` holds ``step == i`` and weights filled with ``i``; ``saved i by PID`` is printed after it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from torchloom.fabric import Fabric


def main(kind: str, out: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1, strategy="fsdp" if kind == "sharded" else "auto")
    fabric.launch()
    model = fabric.setup_module(nn.Linear(1024, 2048))  # 8 MB of float32 weights: a save takes a while
    for step in range(10_000):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(step)
        fabric.save(out / "last.ckpt", {"model": model, "step": step})
        print(f"saved {step} by {os.getpid()}", flush=True)  # the launcher may run this in another process


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
