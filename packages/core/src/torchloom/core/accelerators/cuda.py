"""The CUDA accelerator (NVIDIA GPUs, and AMD GPUs through ROCm builds of torch).

One process per GPU. Accepted ``devices`` specs:

- ``"auto"``, ``-1`` or ``"-1"``: every visible GPU;
- a count ``n >= 1`` such as ``2`` or ``"2"``: GPUs ``0 .. n-1``;
- indices: a list ``[0, 2]`` or a comma string ``"0,2"`` / ``"1,"`` (the trailing comma marks one index).

Rejected: ``0``, ``"0"`` and ``[]`` (no GPU at all: use the CPU accelerator), duplicate indices, and
indices or counts beyond ``torch.cuda.device_count()`` (the message names the available indices).

Counting GPUs must not initialise CUDA in the parent process, or forked workers could no longer use
it: ``torch.cuda.device_count()`` asks NVML first and only falls back to the CUDA runtime.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from typing_extensions import override

from torchloom.core.accelerators.accelerator import Accelerator, DeviceSpec, invalid_devices, normalize_device_spec
from torchloom.core.errors import ConfigurationError, choices

__all__ = ["CUDAAccelerator"]

_ACCEPTED = (
    "'auto' or -1 (all visible GPUs), a count n >= 1 such as 2 or '2' (GPUs 0..n-1), "
    "or distinct GPU indices such as [0, 2], '0,2' or '1,'"
)


class CUDAAccelerator(Accelerator):
    """NVIDIA (or ROCm) GPUs, one per process, with NCCL between them."""

    name: ClassVar[str] = "cuda"
    distributed_backend: ClassVar[str] = "nccl"

    @staticmethod
    @override
    def is_available() -> bool:
        return torch.cuda.device_count() > 0

    @staticmethod
    @override
    def auto_device_count() -> int:
        return torch.cuda.device_count()

    @classmethod
    @override
    def parse_devices(cls, devices: DeviceSpec) -> list[torch.device]:
        spec = normalize_device_spec(devices, cls.name, _ACCEPTED)
        if isinstance(spec, list):
            indices = spec
            if not indices:
                raise invalid_devices(devices, cls.name, _ACCEPTED, "the list is empty")
            if len(set(indices)) != len(indices):
                raise invalid_devices(devices, cls.name, _ACCEPTED, "each GPU index may appear only once")
        elif isinstance(spec, str) or spec == -1:
            indices = list(range(cls._available_count(devices)))
        elif spec >= 1:
            available = cls.auto_device_count()
            if spec > available:
                raise invalid_devices(devices, cls.name, _ACCEPTED, f"{spec} GPUs asked for; {_visible(available)}")
            indices = list(range(spec))
        else:
            reason = "0 GPUs means none: use accelerator='cpu' to run without a GPU" if spec == 0 else ""
            raise invalid_devices(devices, cls.name, _ACCEPTED, reason)
        _check_indices(devices, indices, cls.auto_device_count())
        return [torch.device("cuda", index) for index in indices]

    @classmethod
    def _available_count(cls, devices: object) -> int:
        count = cls.auto_device_count()
        if count == 0:
            raise invalid_devices(devices, cls.name, _ACCEPTED, _visible(0))
        return count

    @override
    def setup_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ConfigurationError(
                f"The 'cuda' accelerator cannot use the device {str(device)!r}; expected a device like 'cuda:0'."
            )
        torch.cuda.set_device(device)

    @override
    def teardown(self) -> None:
        # empty_cache on an uninitialised CUDA would initialise it just to free nothing
        if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            torch.cuda.empty_cache()

    @override
    def get_device_stats(self, device: torch.device) -> dict[str, Any]:
        """The CUDA caching allocator's counters (``torch.cuda.memory_stats``) for ``device``."""
        return dict(torch.cuda.memory_stats(device))


def _check_indices(devices: object, indices: list[int], available: int) -> None:
    bad = [index for index in indices if index < 0 or index >= available]
    if not bad:
        return
    reason = f"no GPU with index {choices(bad)}; {_visible(available)}"
    raise invalid_devices(devices, CUDAAccelerator.name, _ACCEPTED, reason)


def _visible(available: int) -> str:
    if available == 0:
        return "torch sees no CUDA GPU on this machine: check the driver and CUDA_VISIBLE_DEVICES, or use the CPU"
    return f"the available GPU indices are {choices(range(available))}"
