"""``"16-true"`` and ``"bf16-true"``: parameters and math entirely in float16 or bfloat16.

Half the memory of float32 for weights, gradients and optimizer state, at the cost of precision
(no float32 master weights, no loss scaling). bfloat16 keeps float32's range and is the safer of the two.
"""

from __future__ import annotations

from typing import Literal

import torch

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.precision.true_dtype import TrueDtypePrecision

__all__ = ["HalfPrecision"]

_DTYPES = {"16-true": torch.float16, "bf16-true": torch.bfloat16}


class HalfPrecision(TrueDtypePrecision):
    """Everything in ``float16`` (``dtype="16-true"``) or ``bfloat16`` (``dtype="bf16-true"``)."""

    def __init__(self, dtype: Literal["16-true", "bf16-true"]) -> None:
        if not isinstance(dtype, str) or dtype not in _DTYPES:  # a list or dict is not hashable
            raise ConfigurationError(f"HalfPrecision(dtype={dtype!r}) is not supported. Valid: {choices(_DTYPES)}.")
        super().__init__(_DTYPES[dtype])
        self.name = dtype
