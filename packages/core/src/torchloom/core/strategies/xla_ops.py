"""What every XLA strategy does alike: moving a module onto the device, the data loader, the optimizer step,
the precision and the checkpoint I/O (``XLAStrategyBase``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from torchloom.core.accelerators.xla import import_torch_xla
from torchloom.core.checkpoint.io import CheckpointIO
from torchloom.core.checkpoint.xla import XLACheckpointIO
from torchloom.core.precision.precision import Precision
from torchloom.core.precision.xla import as_xla_precision
from torchloom.core.strategies.strategy import Strategy
from torchloom.core.strategies.xla_loader import XLADeviceLoader

__all__ = ["XLAStrategyBase", "move_module", "xla_optimizer_step"]


class XLAStrategyBase(Strategy):
    """The overrides every XLA strategy shares. Listed first beside ``SingleDeviceStrategy`` or
    ``ParallelStrategy``, which bring the process layout: ``class S(XLAStrategyBase, SingleDeviceStrategy)``."""

    uses_xla = True
    supports_inference_mode = False  # XLA tensors made under inference_mode fail in later ops (version counter)

    @override
    def default_checkpoint_io(self) -> CheckpointIO:
        return XLACheckpointIO()

    @override
    def adapt_precision(self, precision: Precision) -> Precision:
        return as_xla_precision(precision, type(self).__name__)

    @override
    def module_to_device(self, module: nn.Module) -> None:
        move_module(module, self.root_device)

    @override
    def process_dataloader(self, dataloader: Iterable[Any]) -> Iterable[Any]:
        return XLADeviceLoader(dataloader, self.batch_to_device)

    @override
    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        return xla_optimizer_step(optimizer, **kwargs)


def move_module(module: nn.Module, device: torch.device) -> None:
    """``module.to(device)``, keeping each parameter object (its contents are swapped onto the device).

    An XLA tensor cannot take a CPU tensor's place in the same object the ordinary way, so a plain ``.to()``
    registers new parameters, and an optimizer built before setup would go on stepping the CPU copies.
    """
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        module.to(device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def xla_optimizer_step(optimizer: Optimizer, gradients_reduced: bool = False, **kwargs: Any) -> Any:
    """Steps ``optimizer`` through ``xm.optimizer_step`` and cuts the XLA graph there (``barrier=True``).

    ``xm.optimizer_step`` averages the gradients over the replicas first when there are several (one
    process per device); with one replica, or under SPMD, where the compiler inserts the collectives,
    there is nothing to average. ``gradients_reduced``: they were averaged already (clipping needs the
    global gradients), so only the step and the graph cut remain. A ``closure`` (forward and backward)
    runs before the average, never inside ``optimizer.step``, and its result is returned, as
    ``optimizer.step(closure)`` would.
    """
    closure = kwargs.pop("closure", None)
    closure_result = closure() if closure is not None else None
    if gradients_reduced:
        result = optimizer.step(**kwargs)
        import_torch_xla("torch_xla", "The XLA optimizer step").sync()
    else:
        xm = import_torch_xla("torch_xla.core.xla_model", "The XLA optimizer step")
        result = xm.optimizer_step(optimizer, barrier=True, optimizer_args=kwargs)
    return closure_result if closure is not None else result
