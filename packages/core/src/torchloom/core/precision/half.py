"""``"16-true"`` and ``"bf16-true"``: parameters and math entirely in float16 or bfloat16.

Half the memory of float32 for weights, gradients and optimizer state, at the cost of precision
(no float32 master weights, no loss scaling). bfloat16 keeps float32's range and is the safer of the two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any, Literal

import torch
from torch import nn
from typing_extensions import override

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.precision.precision import Precision, cast_floating, default_dtype

__all__ = ["HalfPrecision"]

_DTYPES = {"16-true": torch.float16, "bf16-true": torch.bfloat16}


class HalfPrecision(Precision):
    """Everything in ``float16`` (``dtype="16-true"``) or ``bfloat16`` (``dtype="bf16-true"``).

    Inputs are cast to that dtype on the way in, and floating outputs back to the default dtype
    (float32) on the way out, so losses and metrics outside the model stay in full precision.
    """

    def __init__(self, dtype: Literal["16-true", "bf16-true"]) -> None:
        if dtype not in _DTYPES:
            raise ConfigurationError(f"HalfPrecision(dtype={dtype!r}) is not supported. Valid: {choices(_DTYPES)}.")
        self.name = dtype
        self._dtype = _DTYPES[dtype]

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
        # tensors the forward creates itself must match the half-precision weights
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
