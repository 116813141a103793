"""Guards for optional dependencies: check cheaply, import late, fail with the install line."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from torchloom.core.errors import MissingDependencyError

__all__ = ["is_available", "require"]

# module name -> the extra that installs it
_EXTRAS = {"deepspeed": "deepspeed", "torch_xla": "xla", "tensorboard": "tensorboard", "tensorboardX": "tensorboard"}


def is_available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, feature: str) -> ModuleType:
    """Imports ``module`` or raises an error that says how to install it."""
    if not is_available(module):
        extra = _EXTRAS.get(module)
        hint = f"pip install 'torchloom-core[{extra}]'" if extra else f"pip install {module}"
        raise MissingDependencyError(f"{feature} needs the package {module!r}, which is not installed. Run: {hint}")
    return importlib.import_module(module)
