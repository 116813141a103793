"""SingleDeviceXLAStrategy (``"single_xla"``): one process on one XLA device (a TPU core, or XLA's CPU backend)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from torchloom.core.accelerators.accelerator import Accelerator
from torchloom.core.accelerators.xla import import_torch_xla
from torchloom.core.checkpoint.io import CheckpointIO
from torchloom.core.checkpoint.xla import XLACheckpointIO
from torchloom.core.precision.precision import Precision
from torchloom.core.precision.xla import as_xla_precision
from torchloom.core.strategies.single_device import SingleDeviceStrategy
from torchloom.core.strategies.xla_loader import XLADeviceLoader
from torchloom.core.strategies.xla_ops import move_module, xla_optimizer_step

__all__ = ["SingleDeviceXLAStrategy"]


class SingleDeviceXLAStrategy(SingleDeviceStrategy):
    """Runs on ``device`` (default ``xla:0``). torch-xla traces each step into a graph; the optimizer step
    and the data loader cut it (``torch_xla.sync()``), so one compiled graph serves every step.

    Precisions: ``"32-true"``, ``"bf16-true"``, ``"bf16-mixed"`` (see ``XLAPrecision``). Checkpoints are
    written with torch-xla's ``xm.save`` (``XLACheckpointIO``) and hold CPU tensors.
    """

    uses_xla = True
    supports_inference_mode = False  # XLA tensors made under inference_mode fail in later ops (version counter)

    def __init__(
        self,
        device: torch.device | str = "xla:0",
        accelerator: Accelerator | None = None,
        precision: Precision | None = None,
        checkpoint_io: CheckpointIO | None = None,
    ) -> None:
        super().__init__(device=device, accelerator=accelerator, precision=precision, checkpoint_io=checkpoint_io)

    @override
    def default_checkpoint_io(self) -> CheckpointIO:
        return XLACheckpointIO()

    @override
    def adapt_precision(self, precision: Precision) -> Precision:
        return as_xla_precision(precision, type(self).__name__)

    @override
    def setup_environment(self) -> None:
        # a clear error before the first XLA tensor; and the runtime started before any backward: autograd
        # sizes its per-device queues at the first backward of the process
        import_torch_xla("torch_xla", type(self).__name__).device()
        super().setup_environment()

    @override
    def module_to_device(self, module: nn.Module) -> None:
        move_module(module, self.root_device)

    @override
    def process_dataloader(self, dataloader: Iterable[Any]) -> Iterable[Any]:
        return XLADeviceLoader(dataloader, self.batch_to_device)

    @override
    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        return xla_optimizer_step(optimizer, **kwargs)
