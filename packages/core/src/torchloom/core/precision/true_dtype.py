"""Precisions that keep parameters *and* math in one dtype (``"64-true"``, ``"16-true"``, ``"bf16-true"``)."""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from torchloom.core.precision.precision import Precision, cast_floating, default_dtype

__all__ = ["TrueDtypePrecision"]


class TrueDtypePrecision(Precision):
    """Parameters, inputs and the forward pass in ``dtype``; floating outputs leave in the default dtype.

    Inputs are cast on the way in, and outputs back on the way out, so losses and metrics computed
    outside the model stay in the default (float32) precision.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self._dtype = dtype

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        return module.to(dtype=self._dtype)

    @override
    @contextlib.contextmanager
    def tensor_init_context(self) -> Generator[None, None, None]:
        with default_dtype(self._dtype):
            yield

    @override
    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        # tensors the forward creates itself (torch.zeros(...), masks) must match the weights
        with default_dtype(self._dtype):
            yield

    @override
    def convert_input(self, data: Any) -> Any:
        return cast_floating(data, self._dtype)

    @override
    def convert_output(self, data: Any) -> Any:
        return cast_floating(data, torch.get_default_dtype())

    @property
    @override
    def compute_dtype(self) -> torch.dtype:
        return self._dtype
