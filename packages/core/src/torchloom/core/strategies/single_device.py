"""SingleDeviceStrategy: one process computing on one device; collectives are identities."""

from __future__ import annotations

import torch
from typing_extensions import override

from torchloom.core.accelerators.accelerator import Accelerator
from torchloom.core.checkpoint.io import CheckpointIO
from torchloom.core.errors import ConfigurationError
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies.checks import check_wiring
from torchloom.core.strategies.strategy import Strategy

__all__ = ["SingleDeviceStrategy"]


class SingleDeviceStrategy(Strategy):
    """Runs everything on ``device`` (``"cpu"``, ``"cuda:1"`` or a ``torch.device``) in this process."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        accelerator: Accelerator | None = None,
        precision: Precision | None = None,
        checkpoint_io: CheckpointIO | None = None,
    ) -> None:
        check_wiring(accelerator, precision, checkpoint_io)
        super().__init__(accelerator=accelerator, precision=precision, checkpoint_io=checkpoint_io)
        self._root_device = _as_device(device)

    @property
    @override
    def root_device(self) -> torch.device:
        return self._root_device

    @override
    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={str(self._root_device)!r}, accelerator={self._accelerator!r})"


def _as_device(device: object) -> torch.device:
    """``device`` as a ``torch.device``: a ``torch.device``, or a string such as ``"cpu"`` or ``"cuda:1"``."""
    valid = "a torch.device, or a device string such as 'cpu', 'cuda' or 'cuda:1'"
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):  # torch.device(int) silently means the current accelerator's device
        raise ConfigurationError(f"device={device!r} is not valid. Valid: {valid}.")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:  # torch's parser: "Invalid device string", ...
        raise ConfigurationError(f"device={device!r} is not valid ({exc}). Valid: {valid}.") from None
