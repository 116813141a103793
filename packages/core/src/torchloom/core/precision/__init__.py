"""Precision plugins: how numbers are represented during training (float64, float32, mixed, half)."""

from __future__ import annotations

from torchloom.core.precision.amp import MixedPrecision
from torchloom.core.precision.double import DoublePrecision
from torchloom.core.precision.fsdp import FSDPPrecision
from torchloom.core.precision.half import HalfPrecision
from torchloom.core.precision.precision import Precision

__all__ = ["DoublePrecision", "FSDPPrecision", "HalfPrecision", "MixedPrecision", "Precision"]
