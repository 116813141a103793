"""Type checks for the constructor arguments strategies share, so that a wrong object fails when the
strategy is built (naming the argument and what it takes) instead of later, inside the connector or a worker."""

from __future__ import annotations

import torch

from torchloom.core.accelerators.accelerator import Accelerator
from torchloom.core.checkpoint.io import CheckpointIO
from torchloom.core.environments.environment import ClusterEnvironment
from torchloom.core.errors import ConfigurationError
from torchloom.core.precision.precision import Precision

__all__ = ["check_flag", "check_parallel_arguments", "check_wiring"]


def _instance_or_none(name: str, value: object, cls: type, valid: str) -> None:
    if value is not None and not isinstance(value, cls):
        raise ConfigurationError(f"{name}={value!r} is not valid. Valid: None (the connector chooses), or {valid}.")


def check_wiring(accelerator: object, precision: object, checkpoint_io: object) -> None:
    """The objects every strategy may carry: ``None`` or an instance of the right base class."""
    _instance_or_none("accelerator", accelerator, Accelerator, "an Accelerator instance such as CPUAccelerator()")
    _instance_or_none("precision", precision, Precision, "a Precision instance such as MixedPrecision('bf16-mixed')")
    _instance_or_none(
        "checkpoint_io", checkpoint_io, CheckpointIO, "a CheckpointIO instance such as TorchCheckpointIO()"
    )


def check_parallel_arguments(
    parallel_devices: object, cluster_environment: object, process_group_backend: object
) -> None:
    """What a multi-process strategy carries besides the wiring: its devices, environment and backend."""
    if parallel_devices is not None and (
        not isinstance(parallel_devices, (list, tuple))
        or not parallel_devices
        or not all(isinstance(device, torch.device) for device in parallel_devices)
    ):
        raise ConfigurationError(
            f"parallel_devices={parallel_devices!r} is not valid. Valid: None (the connector sets them from "
            "devices=), or a non-empty list of torch.device such as [torch.device('cpu')] * 2."
        )
    _instance_or_none(
        "cluster_environment",
        cluster_environment,
        ClusterEnvironment,
        "a ClusterEnvironment such as LocalEnvironment()",
    )
    if process_group_backend is not None and (
        not isinstance(process_group_backend, str) or not process_group_backend.strip()
    ):
        raise ConfigurationError(
            f"process_group_backend={process_group_backend!r} is not valid. Valid: None (the accelerator's backend), "
            "or a torch.distributed backend name such as 'gloo' or 'nccl'."
        )


def check_flag(name: str, value: object) -> bool:
    """``value`` if it is a bool (``1``, ``"False"`` and other stand-ins are refused: ``bool("False")`` is True)."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name}={value!r} is not valid. Valid: True, False.")
    return value
