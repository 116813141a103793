"""XLAPrecision: the precisions the XLA strategies run (``"32-true"``, ``"bf16-true"``, ``"bf16-mixed"``).

- ``"32-true"``: float32 everywhere.
- ``"bf16-true"``: weights, inputs and math in bfloat16 (XLA's native TPU type); outputs leave as float32.
- ``"bf16-mixed"``: float32 weights, the forward pass under ``torch.autocast("xla", dtype=torch.bfloat16)``.

float16 is refused: TPUs compute in bfloat16, and XLA has no grad scaler to make float16 safe.
XLA strategies swap the precision the connector built for this one (``adapt_precision``), so
``precision="bf16-mixed"`` with ``accelerator="tpu"`` needs nothing XLA-specific from the user.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.precision.amp import MixedPrecision
from torchloom.core.precision.half import HalfPrecision
from torchloom.core.precision.precision import Precision, cast_floating, default_dtype
from torchloom.core.utils.collections import apply_to_collection

__all__ = ["XLA_PRECISIONS", "XLAPrecision", "as_xla_precision"]

XLA_PRECISIONS = ("32-true", "bf16-true", "bf16-mixed")


class XLAPrecision(Precision):
    """One of ``XLA_PRECISIONS`` on XLA devices."""

    def __init__(self, precision: str = "32-true") -> None:
        if not isinstance(precision, str) or precision not in XLA_PRECISIONS:
            raise ConfigurationError(
                f"XLAPrecision(precision={precision!r}) is not supported. Valid: {choices(XLA_PRECISIONS)}."
            )
        self.name = precision

    @property
    def _true_bf16(self) -> bool:
        return self.name == "bf16-true"

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        return module.to(dtype=torch.bfloat16) if self._true_bf16 else module

    @override
    @contextlib.contextmanager
    def tensor_init_context(self) -> Generator[None, None, None]:
        if not self._true_bf16:
            yield
            return
        with default_dtype(torch.bfloat16):
            yield

    @override
    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        if self.name == "bf16-mixed":
            with torch.autocast("xla", dtype=torch.bfloat16):
                yield
        elif self._true_bf16:  # tensors the forward creates itself must match the weights
            with default_dtype(torch.bfloat16):
                yield
        else:
            yield

    @override
    def convert_input(self, data: Any) -> Any:
        # autocast picks each op's dtype itself, so only bf16-true casts inputs down
        return cast_floating(data, torch.bfloat16) if self._true_bf16 else data

    @override
    def convert_output(self, data: Any) -> Any:
        if self.name == "32-true":
            return data

        def to_float32(tensor: Tensor) -> Tensor:
            return tensor.float() if tensor.dtype == torch.bfloat16 else tensor

        return apply_to_collection(data, Tensor, to_float32)

    @property
    @override
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.name == "32-true" else torch.bfloat16


def as_xla_precision(precision: Precision, strategy: str) -> XLAPrecision:
    """``precision`` as the XLA variant of the same name, or a ``ConfigurationError`` listing those XLA runs."""
    if isinstance(precision, XLAPrecision):
        return precision
    if type(precision) in (Precision, HalfPrecision, MixedPrecision) and precision.name in XLA_PRECISIONS:
        return XLAPrecision(precision.name)  # a built-in of that name (what the connector built): nothing to keep
    raise ConfigurationError(
        f"{strategy} cannot run precision={precision.name!r} ({type(precision).__name__}). Valid on XLA devices: "
        f"{choices(XLA_PRECISIONS)}, or an XLAPrecision instance."
    )
