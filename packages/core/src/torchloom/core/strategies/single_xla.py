"""SingleDeviceXLAStrategy (``"single_xla"``): one process on one XLA device (a TPU core, or XLA's CPU backend)."""

from __future__ import annotations

import torch
from typing_extensions import override

from torchloom.core.accelerators.accelerator import Accelerator
from torchloom.core.accelerators.xla import import_torch_xla
from torchloom.core.checkpoint.io import CheckpointIO
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies.single_device import SingleDeviceStrategy
from torchloom.core.strategies.xla_ops import XLAStrategyBase

__all__ = ["SingleDeviceXLAStrategy"]


class SingleDeviceXLAStrategy(XLAStrategyBase, SingleDeviceStrategy):
    """Runs on ``device`` (default ``xla:0``). torch-xla traces each step into a graph; the optimizer step
    and the data loader cut it (``torch_xla.sync()``), so one compiled graph serves every step.

    Precisions: ``"32-true"``, ``"bf16-true"``, ``"bf16-mixed"`` (see ``XLAPrecision``). Checkpoints are
    written with torch-xla's ``xm.save`` (``XLACheckpointIO``) and hold CPU tensors.
    """

    def __init__(
        self,
        device: torch.device | str = "xla:0",
        accelerator: Accelerator | None = None,
        precision: Precision | None = None,
        checkpoint_io: CheckpointIO | None = None,
    ) -> None:
        super().__init__(device=device, accelerator=accelerator, precision=precision, checkpoint_io=checkpoint_io)

    @override
    def setup_environment(self) -> None:
        # a clear error before the first XLA tensor; and the runtime started before any backward: autograd
        # sizes its per-device queues at the first backward of the process
        import_torch_xla("torch_xla", type(self).__name__).device()
        super().setup_environment()
