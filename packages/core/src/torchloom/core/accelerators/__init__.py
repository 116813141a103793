"""Accelerators: the kinds of device torchloom runs on. Importing this package never imports torch-xla."""

from __future__ import annotations

from torchloom.core.accelerators.accelerator import Accelerator, DeviceSpec
from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.accelerators.cuda import CUDAAccelerator
from torchloom.core.accelerators.mps import MPSAccelerator
from torchloom.core.accelerators.xla import XLAAccelerator

__all__ = ["Accelerator", "CPUAccelerator", "CUDAAccelerator", "DeviceSpec", "MPSAccelerator", "XLAAccelerator"]
