"""Strategies: how a job is spread over processes and devices. One hierarchy serves both products."""

from __future__ import annotations

from torchloom.core.strategies.ddp import DDPStrategy
from torchloom.core.strategies.fsdp import FSDPStrategy
from torchloom.core.strategies.model_parallel import ModelParallelStrategy
from torchloom.core.strategies.parallel import ParallelStrategy
from torchloom.core.strategies.redirection import call_through_forward
from torchloom.core.strategies.sharded import ShardedStrategy
from torchloom.core.strategies.single_device import SingleDeviceStrategy
from torchloom.core.strategies.strategy import Strategy, unwrap_module

__all__ = [
    "DDPStrategy",
    "FSDPStrategy",
    "ModelParallelStrategy",
    "ParallelStrategy",
    "ShardedStrategy",
    "SingleDeviceStrategy",
    "Strategy",
    "call_through_forward",
    "unwrap_module",
]
