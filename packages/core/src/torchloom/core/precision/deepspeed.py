"""DeepSpeedPrecision: the precisions a DeepSpeed engine runs, as the config sections that select them.

DeepSpeed casts the module and keeps the master weights itself, so this precision mostly writes config:

- ``"32-true"``: float32 everywhere; no section.
- ``"bf16-mixed"``: DeepSpeed's ``bf16`` mode: the engine holds the module in bfloat16 and computes in it,
  while the ZeRO optimizer keeps float32 master weights and optimizer state (the mixed part). Floating
  point inputs are cast to bfloat16 to match the module.
- ``"bf16-true"``: the same engine mode; the model is also *built* in bfloat16 (``init_module`` /
  ``configure_model``), so no float32 copy of it ever exists outside the optimizer.
- ``"16-mixed"``: DeepSpeed's ``fp16`` mode with dynamic loss scaling (the engine scales the loss in
  ``backward`` and skips steps whose gradients overflow). Needs a device with float16 support: the CPU
  accelerator has none, which the connector reports before any process starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any

import torch

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.precision.precision import Precision, cast_floating, default_dtype

__all__ = ["DEEPSPEED_PRECISIONS", "DeepSpeedPrecision"]

DEEPSPEED_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")
_DTYPES = {
    "32-true": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
}
# dynamic loss scaling from 2**16, halved on overflow, doubled after 1000 clean steps
_FP16_SECTION = {
    "enabled": True,
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
}


class DeepSpeedPrecision(Precision):
    """One of ``DEEPSPEED_PRECISIONS``; ``device_type`` is where the engine runs (``"16-mixed"`` needs a GPU)."""

    def __init__(self, name: str = "32-true", device_type: str = "cpu") -> None:
        if name not in DEEPSPEED_PRECISIONS:
            raise ConfigurationError(
                f"precision={name!r} is not supported by DeepSpeed. Valid: {choices(DEEPSPEED_PRECISIONS)}."
            )
        if name == "16-mixed" and device_type == "cpu":
            raise ConfigurationError(
                "precision='16-mixed' (DeepSpeed's fp16 mode) is not supported on the CPU: DeepSpeed's CPU accelerator "
                "has no float16 support. Valid on the CPU: '32-true', 'bf16-mixed', 'bf16-true'; or use a CUDA device."
            )
        self.name = name
        self.device_type = device_type

    @classmethod
    def from_precision(cls, precision: Precision) -> DeepSpeedPrecision:
        """The DeepSpeed variant of a precision the connector built (same name and device type)."""
        if isinstance(precision, DeepSpeedPrecision):
            return precision
        return cls(precision.name, device_type=getattr(precision, "device_type", "cpu"))

    @property
    def config(self) -> dict[str, Any]:
        """The DeepSpeed config sections for this precision."""
        if self.name.startswith("bf16"):
            return {"bf16": {"enabled": True}}
        if self.name == "16-mixed":
            return {"fp16": dict(_FP16_SECTION)}
        return {}

    @property
    def compute_dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    @contextlib.contextmanager
    def tensor_init_context(self) -> Generator[None, None, None]:
        if self.name == "bf16-true":
            with default_dtype(torch.bfloat16):
                yield
        else:
            yield

    def convert_input(self, data: Any) -> Any:
        dtype = self.compute_dtype
        return data if dtype is torch.float32 else cast_floating(data, dtype)

    @property
    def skips_nonfinite_steps(self) -> bool:
        return self.name == "16-mixed"  # the engine's loss scaler skips overflowing steps
