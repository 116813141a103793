"""A script for strategy "ddp": ``fabric.launch()`` re-runs it as 2 workers under torch elastic.

Prints ``BEFORE LAUNCH`` in the launching process and in each worker, and ``WORKER ...`` lines from the
workers only (the launching process exits inside ``launch()`` once they succeed).
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torchloom.core.strategies.ddp import DDPStrategy
from torchloom.fabric import Fabric

TIMEOUT_S = 60


def times_two_plus_rank(fabric: Fabric, value: int) -> int:
    return value * 2 + fabric.global_rank


def main() -> None:
    import datetime

    strategy = DDPStrategy(timeout=datetime.timedelta(seconds=TIMEOUT_S))  # start_method "popen": strategy "ddp"
    fabric = Fabric(accelerator="cpu", strategy=strategy, devices=2)
    role = "worker" if "LOCAL_RANK" in os.environ else "agent"
    print(f"BEFORE LAUNCH role={role}", flush=True)
    fabric.launch()
    rank = fabric.global_rank
    total = fabric.all_reduce(torch.tensor(float(rank + 1)), reduce_op="sum")
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(torch.arange(8)), batch_size=2))
    assert isinstance(loader.sampler, DistributedSampler) and len(loader) == 2
    result = fabric.launch(times_two_plus_rank, 5)  # a worker already: runs here
    fabric.print("PRINTED by local rank 0")
    os.write(1, f"WORKER rank={rank} world_size={fabric.world_size} total={total.item()} result={result}\n".encode())


if __name__ == "__main__":
    main()
    sys.exit(0)
