"""``"64-true"``: float64 parameters and math, for numerically delicate work (and gradient checks)."""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from torchloom.core.precision.precision import Precision, cast_floating, default_dtype

__all__ = ["DoublePrecision"]


class DoublePrecision(Precision):
    """Keeps parameters, inputs and the forward pass in float64; outputs leave in the default dtype."""

    name = "64-true"

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        return module.double()

    @override
    @contextlib.contextmanager
    def tensor_init_context(self) -> Generator[None, None, None]:
        with default_dtype(torch.float64):
            yield

    @override
    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        # tensors the forward creates itself (torch.zeros(...), masks) must match the float64 weights
        with default_dtype(torch.float64):
            yield

    @override
    def convert_input(self, data: Any) -> Any:
        return cast_floating(data, torch.float64)

    @override
    def convert_output(self, data: Any) -> Any:
        return cast_floating(data, torch.get_default_dtype())

    @property
    @override
    def compute_dtype(self) -> torch.dtype:
        return torch.float64
