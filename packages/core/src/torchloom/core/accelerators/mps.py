"""The MPS accelerator (Apple silicon GPUs through Metal).

A Mac has one MPS device, so one process uses it. Accepted ``devices`` specs, all meaning that
device: ``"auto"``, ``1``, ``"1"``, ``-1``, ``"-1"``, ``[0]`` and ``"0,"``. Anything else is rejected.
MPS has no collective backend of its own; several processes would talk over gloo.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from typing_extensions import override

from torchloom.core.accelerators.accelerator import Accelerator, DeviceSpec, invalid_devices, normalize_device_spec
from torchloom.core.errors import ConfigurationError, choices

__all__ = ["MPSAccelerator"]

_ACCEPTED = f"{choices(['auto', 1, '1', -1, '-1', [0], '0,'])} (the one MPS device)"


class MPSAccelerator(Accelerator):
    """The Apple-silicon GPU of this Mac."""

    name: ClassVar[str] = "mps"
    distributed_backend: ClassVar[str] = "gloo"

    @staticmethod
    @override
    def is_available() -> bool:
        return torch.backends.mps.is_available()

    @staticmethod
    @override
    def auto_device_count() -> int:
        return 1

    @classmethod
    @override
    def parse_devices(cls, devices: DeviceSpec) -> list[torch.device]:
        spec = normalize_device_spec(devices, cls.name, _ACCEPTED)
        if spec in ("auto", 1, -1, [0]):
            return [torch.device("mps", 0)]
        raise invalid_devices(devices, cls.name, _ACCEPTED, "a Mac has a single MPS device")

    @override
    def setup_device(self, device: torch.device) -> None:
        if device.type != "mps":
            raise ConfigurationError(f"The 'mps' accelerator cannot use the device {str(device)!r}; expected 'mps'.")

    @override
    def teardown(self) -> None:
        if self.is_available():
            torch.mps.empty_cache()

    @override
    def get_device_stats(self, device: torch.device) -> dict[str, Any]:
        """Memory held by tensors, by the Metal driver in total, and the recommended working-set limit."""
        return {
            "mps_current_allocated_bytes": torch.mps.current_allocated_memory(),
            "mps_driver_allocated_bytes": torch.mps.driver_allocated_memory(),
            "mps_recommended_max_bytes": torch.mps.recommended_max_memory(),
        }
