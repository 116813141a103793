"""One real XLA replica under ``strategy="xla"`` (torch_xla.launch), in its own process.

``python -m tests.xla.replica_job OUT`` with ``PJRT_DEVICE=CPU``: trains through Fabric (``fabric.launch``) and the
Trainer, and writes the weights and what the workers saw to ``OUT``. With ``PJRT_DEVICE=TPU`` on a TPU host the same
job runs one replica per chip (the real multi-replica test).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from tests.xla.loops import fabric_run, trainer_run
from torchloom.fabric import Fabric


def train(fabric: Fabric) -> dict[str, Any]:
    weights, losses = fabric_run(fabric, clip=0.5)
    gathered = fabric.all_gather(torch.tensor([float(fabric.global_rank)]))
    return {
        "weights": weights,
        "losses": losses,
        "world_size": fabric.world_size,
        "gathered": gathered.cpu(),
        "broadcast": fabric.broadcast(f"from rank {fabric.global_rank}"),
        "device": str(fabric.device),
    }


def main(out: Path) -> None:
    fabric = Fabric(accelerator="tpu", strategy="xla")
    result = fabric.launch(train)
    _, module = trainer_run(str(out.parent / "trainer"), accelerator="tpu", strategy="xla")
    result["trainer_weights"] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    result["strategy"] = type(fabric.strategy).__name__
    torch.save(result, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
