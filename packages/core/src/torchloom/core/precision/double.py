"""``"64-true"``: float64 parameters and math, for numerically delicate work (and gradient checks)."""

from __future__ import annotations

import torch

from torchloom.core.precision.true_dtype import TrueDtypePrecision

__all__ = ["DoublePrecision"]


class DoublePrecision(TrueDtypePrecision):
    """Keeps parameters, inputs and the forward pass in float64; outputs leave in the default dtype."""

    name = "64-true"

    def __init__(self) -> None:
        super().__init__(torch.float64)
