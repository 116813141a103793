"""Skipping parameter initialisation when weights will be overwritten (e.g. by a checkpoint)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SkipInit"]

# The in-place fills that layers' reset_parameters() call: torch.nn.init's public ``*_`` functions
# (a mode sees the outer call only, e.g. kaiming_uniform_, not the uniform_ inside it) and the
# Tensor methods they are built on, for layers that call those directly.
_TENSOR_FILLS = ("uniform_", "normal_", "fill_", "zero_", "random_", "bernoulli_", "exponential_", "log_normal_")
_INIT_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    [getattr(torch.nn.init, n) for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    + [getattr(torch.Tensor, n) for n in _TENSOR_FILLS]
)


class SkipInit(TorchFunctionMode):
    """While active, initialisation fills return their tensor untouched: memory is allocated, not written.

    Saves the time of initialising weights that a checkpoint load replaces right after.
    """

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self.enabled and func in _INIT_FUNCTIONS:
            # torch.nn.init passes the tensor by keyword; Tensor methods get it as ``self``.
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)
