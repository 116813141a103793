"""The small model and tensor helpers that the sharded-training tests of core and Fabric share."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class Block(nn.Module):
    """A residual layer that counts its forward calls (activation checkpointing runs it twice)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        out: Tensor = torch.relu(self.fc(x)) + x
        return out


class Net(nn.Module):
    """Linear in, two Blocks, Linear out; ``extra=True`` adds a layer (for strict-loading errors)."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.blocks = nn.ModuleList([Block(16), Block(16)])
        self.out = nn.Linear(16, 3)
        if extra:
            self.extra = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        out: Tensor = self.out(x)
        return out


def full(tensor: Any) -> Tensor:
    """The whole tensor behind a DTensor (a plain tensor as it is), detached."""
    whole: Tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return whole.detach()


def clean(name: str) -> str:
    """A parameter name as the state dict spells it (activation checkpointing's wrapper dropped)."""
    return name.replace("_checkpoint_wrapped_module.", "")


def full_params(model: nn.Module) -> dict[str, Tensor]:
    """Full copies of the parameters, by state-dict name."""
    return {clean(name): full(p).clone() for name, p in model.named_parameters()}
