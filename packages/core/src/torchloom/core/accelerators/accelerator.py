"""The Accelerator contract: a device *type* (CPU, CUDA, MPS, XLA), never a particular device."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch

from torchloom.core.errors import ConfigurationError

__all__ = ["Accelerator", "DeviceSpec", "invalid_devices", "normalize_device_spec"]

# What users may pass as ``devices``: "auto", an int n, -1 (all), a list of indices, "0,1" or "2".
DeviceSpec = int | str | list[int] | tuple[int, ...]


def invalid_devices(devices: object, accelerator: str, accepted: str, reason: str = "") -> ConfigurationError:
    """The error for a device spec an accelerator cannot use; ``accepted`` lists the forms it takes."""
    why = f" ({reason})" if reason else ""
    return ConfigurationError(
        f"devices={devices!r} is not valid for the {accelerator!r} accelerator{why}. Accepted forms: {accepted}."
    )


def normalize_device_spec(devices: object, accelerator: str, accepted: str) -> Literal["auto"] | int | list[int]:
    """Reduces the string and sequence forms of a device spec to ``"auto"``, an int or a list of indices.

    ``"2"`` becomes the count ``2``, ``"-1"`` becomes ``-1``, ``"0,2"`` and ``"1,"`` become index lists.
    What the numbers mean (processes, GPU indices, ...) is up to each accelerator.
    """
    if isinstance(devices, bool):  # bool is an int subclass; devices=True is a mistake, not a count
        raise invalid_devices(devices, accelerator, accepted)
    if isinstance(devices, int):
        return devices
    if isinstance(devices, str):
        text = devices.strip()
        if text.lower() == "auto":
            return "auto"
        if "," in text:
            parts = [part.strip() for part in text.split(",") if part.strip()]
            if not parts or not all(part.isdigit() for part in parts):
                raise invalid_devices(devices, accelerator, accepted)
            return [int(part) for part in parts]
        if text.isdigit() or text == "-1":
            return int(text)
        raise invalid_devices(devices, accelerator, accepted)
    if isinstance(devices, (list, tuple)):
        if not all(isinstance(index, int) and not isinstance(index, bool) for index in devices):
            raise invalid_devices(devices, accelerator, accepted, "a list must hold integer device indices")
        return list(devices)
    raise invalid_devices(devices, accelerator, accepted)


class Accelerator(ABC):
    """A kind of device. Strategies ask it which devices to use and how to prepare them.

    ``name`` is the registry name (``"cpu"``, ``"cuda"``, ...); ``distributed_backend`` the
    ``torch.distributed`` backend that suits it (``"gloo"``, ``"nccl"``, ``"xla"``).
    """

    name: ClassVar[str]
    distributed_backend: ClassVar[str] = "gloo"

    @staticmethod
    @abstractmethod
    def is_available() -> bool:
        """Whether at least one device of this type can be used by this process."""

    @staticmethod
    @abstractmethod
    def auto_device_count() -> int:
        """How many devices ``devices="auto"`` means (CPU: 1 process)."""

    @classmethod
    @abstractmethod
    def parse_devices(cls, devices: DeviceSpec) -> list[torch.device]:
        """Turns a user device spec into concrete devices, one per local process.

        Raises ``ConfigurationError`` naming the bad spec and the accepted forms.
        """

    @abstractmethod
    def setup_device(self, device: torch.device) -> None:
        """Makes ``device`` current for this process (e.g. ``torch.cuda.set_device``)."""

    def teardown(self) -> None:
        """Releases what ``setup_device`` acquired (caches, handles)."""

    @abstractmethod
    def get_device_stats(self, device: torch.device) -> dict[str, Any]:
        """Numbers worth logging about ``device`` (memory, utilisation)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
