"""Skipping parameter initialisation when weights will be overwritten (e.g. by a checkpoint)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SkipInit"]

# The in-place fills that torch.nn.init and the layers' reset_parameters() end up calling.
_INIT_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        torch.Tensor.uniform_,
        torch.Tensor.normal_,
        torch.Tensor.fill_,
        torch.Tensor.zero_,
        torch.Tensor.random_,
        torch.Tensor.bernoulli_,
        torch.Tensor.exponential_,
        torch.Tensor.geometric_,
        torch.Tensor.log_normal_,
        torch.Tensor.cauchy_,
        torch.nn.init.trunc_normal_,
        torch.nn.init.orthogonal_,
        torch.nn.init.sparse_,
        torch.nn.init.eye_,
        torch.nn.init.dirac_,
    }
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
        if self.enabled and func in _INIT_FUNCTIONS and args:
            return args[0]
        return func(*args, **(kwargs or {}))
