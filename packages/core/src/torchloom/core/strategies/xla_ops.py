"""What every XLA strategy does alike: moving a module onto the device, and the optimizer step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from torchloom.core.accelerators.xla import import_torch_xla

__all__ = ["move_module", "xla_optimizer_step"]


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
