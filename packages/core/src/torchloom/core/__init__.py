"""torchloom.core: the hardware layer shared by torchloom-fabric and torchloom-trainer.

Importing this package is cheap: it never imports deepspeed, torch_xla or tensorboard, and the
submodules are loaded on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> submodule that defines it; resolved lazily so `import torchloom.core` stays light.
_EXPORTS = {
    "Accelerator": "accelerators",
    "CPUAccelerator": "accelerators",
    "CUDAAccelerator": "accelerators",
    "MPSAccelerator": "accelerators",
    "XLAAccelerator": "accelerators",
    "Precision": "precision",
    "ClusterEnvironment": "environments",
    "Launcher": "launchers",
    "CheckpointIO": "checkpoint",
    "TorchCheckpointIO": "checkpoint",
    "Strategy": "strategies",
    "ParallelStrategy": "strategies",
    "SingleDeviceStrategy": "strategies",
    "DDPStrategy": "strategies",
    "ShardedStrategy": "strategies",
    "FSDPStrategy": "strategies",
    "ModelParallelStrategy": "strategies",
    "FSDPPrecision": "precision",
    "Connector": "connector",
    "Setup": "connector",
    "ConfigurationError": "errors",
    "TorchloomError": "errors",
}

__all__ = [
    "Accelerator",
    "CPUAccelerator",
    "CUDAAccelerator",
    "CheckpointIO",
    "ClusterEnvironment",
    "ConfigurationError",
    "Connector",
    "DDPStrategy",
    "FSDPPrecision",
    "FSDPStrategy",
    "Launcher",
    "MPSAccelerator",
    "ModelParallelStrategy",
    "ParallelStrategy",
    "Precision",
    "Setup",
    "ShardedStrategy",
    "SingleDeviceStrategy",
    "Strategy",
    "TorchCheckpointIO",
    "TorchloomError",
    "XLAAccelerator",
    "__version__",
]

if TYPE_CHECKING:
    from torchloom.core.accelerators import (
        Accelerator,
        CPUAccelerator,
        CUDAAccelerator,
        MPSAccelerator,
        XLAAccelerator,
    )
    from torchloom.core.checkpoint import CheckpointIO, TorchCheckpointIO
    from torchloom.core.connector import Connector, Setup
    from torchloom.core.environments import ClusterEnvironment
    from torchloom.core.errors import ConfigurationError, TorchloomError
    from torchloom.core.launchers import Launcher
    from torchloom.core.precision import FSDPPrecision, Precision
    from torchloom.core.strategies import (
        DDPStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        ParallelStrategy,
        ShardedStrategy,
        SingleDeviceStrategy,
        Strategy,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torchloom.core' has no attribute {name!r}")
    return getattr(importlib.import_module(f"torchloom.core.{module}"), name)
