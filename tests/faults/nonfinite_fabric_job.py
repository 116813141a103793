"""Two DDP ranks (``python nonfinite_fabric_job.py OUT``, re-run as 2 workers) run a Fabric loop with
NonFiniteGuard(mode="stop"); only rank 1's loss turns NaN, at step 5. Each rank writes the error it got to
``OUT/rank<R>.txt``."""

from __future__ import annotations

import math
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import nn

from torchloom.fabric import Fabric, NonFiniteGuard


def main(out: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    torch.manual_seed(0)
    model = fabric.setup_module(nn.Linear(3, 1))
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.05))
    guard = NonFiniteGuard(fabric, "stop", check_every_n_steps=4)
    generator = torch.Generator().manual_seed(fabric.global_rank)
    message = "no error"
    try:
        for step in range(12):
            x = torch.randn(4, 3, generator=generator)
            loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
            if step == 5 and fabric.global_rank == 1:
                loss = loss * math.nan
            fabric.backward(loss)
            if guard.step_ok(loss, optimizer):
                optimizer.step()
            optimizer.zero_grad()
        guard.finish()
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
    (out / f"rank{fabric.global_rank}.txt").write_text(message)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
