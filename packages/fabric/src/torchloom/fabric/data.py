"""What ``fabric.setup_dataloaders`` does to one ``DataLoader``: prepared by core, processed by the strategy, wrapped.

Core's ``torchloom.core.data.prepare_dataloader`` gives the loader a distributed sampler where the
strategy splits data and seeded workers after ``seed_everything(..., workers=True)``; the
``FabricDataLoader`` around it sets the sampler's epoch each pass and moves batches to the device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from torchloom.core.data import prepare_dataloader
from torchloom.core.errors import ConfigurationError
from torchloom.core.strategies.strategy import Strategy
from torchloom.fabric.checks import FabricUsageError
from torchloom.fabric.wrappers import FabricDataLoader

__all__ = ["setup_dataloader"]


def setup_dataloader(
    dataloader: Any, strategy: Strategy, sampler_kwargs: dict[str, Any] | None, rank: int, device: torch.device | None
) -> FabricDataLoader:
    """What ``fabric.setup_dataloaders`` returns for one ``DataLoader``: prepared, processed by the strategy, wrapped."""
    if isinstance(dataloader, FabricDataLoader):
        raise FabricUsageError("This dataloader was set up already; pass the plain DataLoader once.")
    if not isinstance(dataloader, DataLoader):
        raise ConfigurationError(
            f"setup_dataloaders() takes torch.utils.data.DataLoader objects, got {type(dataloader).__name__}."
        )
    prepared = prepare_dataloader(dataloader, sampler_kwargs, rank)
    return FabricDataLoader(strategy.process_dataloader(prepared), strategy, device)
