"""The XLA accelerator (registered as ``"tpu"``): TPUs, or XLA's CPU backend for testing, through torch-xla.

torch-xla starts one process per device on a host and cannot run an arbitrary subset of them, so
the accepted ``devices`` specs are:

- ``1`` or ``"1"``: one device, ``xla:0``;
- ``"auto"``, ``-1``, ``"-1"`` or the host's device count ``n``: every device, ``xla:0 .. xla:n-1``;
- one index ``[i]`` or ``"i,"``: only device ``i``.

torch-xla is optional: nothing here imports it until a device count or memory figure is needed, and
then a missing install raises ``MissingDependencyError`` with the ``pip install`` line. Each torch-xla
wheel works with exactly one torch minor version (it does not say so in its metadata; a mismatch fails
at import with an undefined symbol), so ``import_torch_xla`` compares the two before importing and
names the versions that match. Counting devices does not start the XLA runtime, so torch-xla's
launcher can still start the workers after.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from types import ModuleType
from typing import Any, ClassVar

import torch
from typing_extensions import override

from torchloom.core.accelerators.accelerator import Accelerator, DeviceSpec, invalid_devices, normalize_device_spec
from torchloom.core.errors import ConfigurationError, MissingDependencyError
from torchloom.core.utils.imports import is_available

__all__ = ["TorchXLAMissingError", "XLAAccelerator", "import_torch_xla"]

_INSTALL = "pip install 'torchloom-core[xla]'"  # the extra pins torch-xla together with its torch


class TorchXLAMissingError(MissingDependencyError, ConfigurationError):
    """torch-xla is not installed, or is built for another torch: a missing dependency, and at the same time a
    setting (``accelerator='tpu'``, an XLA strategy) this environment cannot run, so code that handles either
    kind of error handles it."""


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def import_torch_xla(module: str, feature: str) -> ModuleType:
    """Imports ``module`` (``torch_xla`` or one of its submodules) for ``feature``.

    Raises ``TorchXLAMissingError`` (a ``MissingDependencyError``) when torch-xla is not installed, or is built for another torch
    minor version than this process runs (both messages name the matching versions and the install line).
    """
    torch_version = torch.__version__.split("+")[0]
    if not is_available("torch_xla"):
        raise TorchXLAMissingError(
            f"{feature} needs the package 'torch_xla' (torch-xla), which is not installed. Run: {_INSTALL}, which "
            f"installs torch-xla with the torch it is built for (torch-xla 2.9 needs torch 2.9.x; this environment "
            f"has torch {torch_version})."
        )
    try:
        xla_version = importlib.metadata.version("torch-xla")
    except importlib.metadata.PackageNotFoundError:  # a source checkout: trust it
        xla_version = None
    if xla_version is not None and _minor(xla_version) != _minor(torch_version):
        raise TorchXLAMissingError(
            f"{feature} needs a torch-xla built for this torch: torch-xla {xla_version} is installed, which works "
            f"only with torch {_minor(xla_version)}.x, but this environment has torch {torch_version}. Install a "
            f"matching pair: pip install torch=={_minor(xla_version)}.* torch-xla=={xla_version}, or {_INSTALL}."
        )
    first_import = "torch_xla" not in sys.modules
    chosen = os.environ.get("PJRT_DEVICE")
    imported = importlib.import_module(module)
    if first_import and chosen is None and os.environ.get("PJRT_DEVICE") == "CPU":
        # importing torch_xla picks XLA on the CPU where it finds no TPU; that is for tests and must be asked
        # for (PJRT_DEVICE=CPU), or accelerator='auto' would choose it on every machine with torch-xla
        del os.environ["PJRT_DEVICE"]
    return imported


_ACCEPTED = "1 (one device), 'auto' or -1 or the device count (all devices), or a single index such as [2] or '2,'"


class XLAAccelerator(Accelerator):
    """XLA devices through torch-xla's PJRT runtime (``PJRT_DEVICE`` = ``TPU``, ``CPU`` or ``CUDA``)."""

    name: ClassVar[str] = "tpu"
    distributed_backend: ClassVar[str] = "xla"

    @staticmethod
    @override
    def is_available() -> bool:
        if not is_available("torch_xla"):
            return False
        import_torch_xla("torch_xla", "The 'tpu' (XLA) accelerator")  # an installed but broken torch-xla is loud
        try:
            return XLAAccelerator.auto_device_count() > 0
        except (OSError, ValueError):  # e.g. no TPU metadata server off Google Cloud
            return False

    @staticmethod
    @override
    def auto_device_count() -> int:
        """Devices on this host, found from the environment and PCI, without starting the runtime."""
        import_torch_xla("torch_xla", "The 'tpu' (XLA) accelerator")
        device_type = os.environ.get("PJRT_DEVICE", "TPU").upper()
        if device_type == "CPU":
            return int(os.environ.get("CPU_NUM_DEVICES", "1"))
        if device_type in ("CUDA", "GPU"):
            return int(os.environ.get("GPU_NUM_DEVICES", str(torch.cuda.device_count())))
        tpu = import_torch_xla("torch_xla._internal.tpu", "The 'tpu' (XLA) accelerator")
        if tpu.num_available_chips() == 0:
            return 0  # the per-chip core count would query cloud metadata that does not exist here
        return int(tpu.num_available_devices())

    @staticmethod
    def explain_unavailable() -> None:
        """Raises the reason this host has no XLA device: torch-xla missing or mismatched, or no device found."""
        import_torch_xla("torch_xla", "accelerator='tpu'")
        raise ConfigurationError(
            "accelerator='tpu' found no XLA device: this host has no TPU chips and PJRT_DEVICE is "
            f"{os.environ.get('PJRT_DEVICE')!r}. Valid: run on a TPU host, set PJRT_DEVICE=CPU (with CPU_NUM_DEVICES=n "
            "for n devices) to run XLA on the CPU, or choose accelerator='cpu' or 'auto'."
        )

    @classmethod
    @override
    def parse_devices(cls, devices: DeviceSpec) -> list[torch.device]:
        spec = normalize_device_spec(devices, cls.name, _ACCEPTED)
        if isinstance(spec, list):
            if len(spec) != 1:
                raise invalid_devices(devices, cls.name, _ACCEPTED, "give one index, or a count for several devices")
            index = spec[0]
            available = cls.auto_device_count()
            if not 0 <= index < available:
                raise invalid_devices(
                    devices, cls.name, _ACCEPTED, f"this host has {available} XLA devices, indices 0..{available - 1}"
                )
            return [torch.device("xla", index)]
        if spec == 1:
            return [torch.device("xla", 0)]
        if isinstance(spec, int) and spec != -1 and spec < 1:
            raise invalid_devices(devices, cls.name, _ACCEPTED)
        available = cls.auto_device_count()
        if available == 0:
            raise invalid_devices(devices, cls.name, _ACCEPTED, "torch-xla finds no device on this host")
        if spec not in ("auto", -1, available):
            raise invalid_devices(
                devices, cls.name, _ACCEPTED, f"torch-xla runs either 1 or all {available} devices of a host"
            )
        return [torch.device("xla", index) for index in range(available)]

    @override
    def setup_device(self, device: torch.device) -> None:
        # torch-xla makes each worker's device current itself; only check that it is an XLA device
        if device.type != "xla":
            raise ConfigurationError(
                f"The 'tpu' accelerator cannot use the device {str(device)!r}; expected a device like 'xla:0'."
            )

    @override
    def get_device_stats(self, device: torch.device) -> dict[str, Any]:
        """torch-xla's memory figures for ``device`` (key names vary with the torch-xla version)."""
        xm = import_torch_xla("torch_xla.core.xla_model", "XLA device statistics")
        return dict(xm.get_memory_info(device))
