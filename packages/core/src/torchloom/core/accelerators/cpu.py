"""The CPU accelerator.

On the CPU, ``devices`` counts *processes*: every process uses ``torch.device("cpu")``, and the
operating system spreads them over the cores. Accepted specs:

- ``"auto"``, ``-1`` or ``"-1"``: one process (the CPU is one device; ``-1`` means "all" = that one);
- a count ``n >= 1`` such as ``2`` or ``"2"``: ``n`` processes, at most ``MAX_PROCESSES`` (a larger count is a
  typo, and building that many devices would exhaust memory before anything could fail).

Index lists (``[0, 1]``, ``"0,1"``) are rejected: CPU processes have no device index to pick.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, ClassVar

import torch
from typing_extensions import override

from torchloom.core.accelerators.accelerator import Accelerator, DeviceSpec, invalid_devices, normalize_device_spec
from torchloom.core.errors import ConfigurationError

__all__ = ["MAX_PROCESSES", "CPUAccelerator"]

MAX_PROCESSES = 4096  # processes per node; far beyond what a CPU node runs usefully
_ACCEPTED = f"'auto' or -1 (one process), or a process count n from 1 to {MAX_PROCESSES} such as 2 or '2'"


class CPUAccelerator(Accelerator):
    """Runs on the CPU; ``devices=n`` starts ``n`` processes."""

    name: ClassVar[str] = "cpu"
    distributed_backend: ClassVar[str] = "gloo"

    def __init__(self) -> None:
        # get_device_stats reports CPU use since the previous call (or since this object was made)
        self._last_wall = time.monotonic()
        self._last_cpu = time.process_time()

    @staticmethod
    @override
    def is_available() -> bool:
        return True

    @staticmethod
    @override
    def auto_device_count() -> int:
        return 1

    @classmethod
    @override
    def parse_devices(cls, devices: DeviceSpec) -> list[torch.device]:
        spec = normalize_device_spec(devices, cls.name, _ACCEPTED)
        if isinstance(spec, list):
            raise invalid_devices(
                devices, cls.name, _ACCEPTED, "CPU processes have no device index; pass a process count instead"
            )
        if spec == "auto" or spec == -1:
            count = cls.auto_device_count()
        elif 1 <= spec <= MAX_PROCESSES:
            count = spec
        else:
            raise invalid_devices(devices, cls.name, _ACCEPTED)
        return [torch.device("cpu")] * count

    @override
    def setup_device(self, device: torch.device) -> None:
        if device.type != "cpu":
            raise ConfigurationError(f"The 'cpu' accelerator cannot use the device {str(device)!r}; expected 'cpu'.")

    @override
    def get_device_stats(self, device: torch.device) -> dict[str, Any]:
        """This process's resident memory and CPU use; ``cpu_percent`` may exceed 100 with several threads."""
        now_wall, now_cpu = time.monotonic(), time.process_time()
        elapsed = now_wall - self._last_wall
        stats: dict[str, Any] = {
            "cpu_percent": 100.0 * (now_cpu - self._last_cpu) / elapsed if elapsed > 0 else 0.0,
        }
        self._last_wall, self._last_cpu = now_wall, now_cpu
        rss = _current_rss_bytes()
        if rss is not None:
            stats["cpu_rss_bytes"] = rss
        if sys.platform != "win32":
            import resource

            usage = resource.getrusage(resource.RUSAGE_SELF)
            # ru_maxrss is in KiB on Linux and in bytes on macOS
            stats["cpu_peak_rss_bytes"] = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
            stats["cpu_user_seconds"] = usage.ru_utime
            stats["cpu_system_seconds"] = usage.ru_stime
        return stats


def _current_rss_bytes() -> int | None:
    """Resident set size from ``/proc`` (Linux); ``None`` where there is no ``/proc``."""
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
