"""A script for strategy "ddp": ``fabric.launch()`` re-runs it as 2 workers under torch elastic.

Prints ``BEFORE LAUNCH`` in the launching process and in each worker, and ``WORKER ...`` lines from the
workers only (the launching process exits inside ``launch()`` once they succeed).

``python ddp_script.py PARITY_DIR``: afterwards the workers also run the 2-rank parity loops of
``parity_helpers.py`` (test_parity.py compares them), sparing that test a launch of its own. An exception
there is written to ``PARITY_DIR/parity-error-rank<r>.txt`` instead of failing the job, so that it fails
the parity test only.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

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
    if len(sys.argv) > 1:
        parity_loops(Path(sys.argv[1]), rank)


def parity_loops(out_dir: Path, rank: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root, for tests.fabric
    try:
        from tests.fabric.parity_helpers import run_ddp_loops

        run_ddp_loops(out_dir)
    except Exception:
        (out_dir / f"parity-error-rank{rank}.txt").write_text(traceback.format_exc())


if __name__ == "__main__":
    main()
    sys.exit(0)
