"""2-rank DDP step overhead: plain ``DistributedDataParallel`` vs Fabric(strategy="ddp") vs Trainer(strategy="ddp").

The same workloads, precisions, seeds and training code as the single-process benchmark (``step_overhead.py``),
each job started as 2 ranks by ``python -m torch.distributed.run`` (gloo on 127.0.0.1), every variant launched
the same way so only the per-step cost differs; rank 0's step times are reported, against the same targets.
"""

from __future__ import annotations

from tools.bench.common import Row
from tools.bench.step_overhead import measure_steps

__all__ = ["WORLD_SIZE", "run_ddp_overhead"]

WORLD_SIZE = 2


def run_ddp_overhead(repetitions: int, quick: bool) -> list[Row]:
    return measure_steps("ddp step", repetitions, quick, world_size=WORLD_SIZE)
