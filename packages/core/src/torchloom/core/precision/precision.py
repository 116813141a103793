"""The Precision contract, and the default ``"32-true"`` implementation (float32, no autocast)."""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torchloom.core.utils.collections import apply_to_collection

__all__ = ["Precision", "cast_floating", "default_dtype"]


def cast_floating(data: Any, dtype: torch.dtype) -> Any:
    """``data`` with every floating point tensor in it (nested collections too) cast to ``dtype``."""

    def cast(tensor: Tensor) -> Tensor:
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    return apply_to_collection(data, Tensor, cast)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Generator[None, None, None]:
    """Makes ``dtype`` torch's default floating point dtype inside, and restores the old one after, even on error."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


_NOTHING = contextlib.nullcontext()  # reusable and reentrant


class Precision:
    """How numbers are represented during training.

    The base class is ``"32-true"``: it changes nothing. Subclasses override the hooks they need;
    every hook has one signature so that both products call them the same way.
    """

    # The registry name. A plain attribute, not a ClassVar: one class may serve several names
    # (MixedPrecision is "16-mixed" or "bf16-mixed") and sets it per instance.
    name: str = "32-true"

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Casts parameters/buffers where the precision keeps them in another dtype."""
        return module

    @contextlib.contextmanager
    def module_init_context(self) -> Generator[None, None, None]:
        """Active while the user builds the model, so parameters are created in the right dtype."""
        with self.tensor_init_context():
            yield

    @contextlib.contextmanager
    def tensor_init_context(self) -> Generator[None, None, None]:
        """Active while the user creates tensors that should get the precision's default dtype."""
        yield

    def forward_context(self) -> contextlib.AbstractContextManager[None]:
        """Wraps the forward pass (autocast for mixed precision). Entered every step: the base's is free."""
        return _NOTHING

    def convert_input(self, data: Any) -> Any:
        """Casts floating point inputs to the compute dtype."""
        return data

    def convert_output(self, data: Any) -> Any:
        """Casts floating point outputs back to the default dtype."""
        return data

    def pre_backward(self, tensor: Tensor, module: nn.Module | None) -> Tensor:
        """Returns the tensor to call backward on (scaled by a grad scaler, for example)."""
        return tensor

    def backward(self, tensor: Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        tensor.backward(*args, **kwargs)  # type: ignore[no-untyped-call]

    def post_backward(self, tensor: Tensor, module: nn.Module | None) -> Tensor:
        return tensor

    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        """Steps ``optimizer``; a precision with a grad scaler skips steps with non-finite grads."""
        return optimizer.step(**kwargs)

    def unscale_gradients(self, optimizer: Optimizer) -> None:
        """Divides gradients by the loss scale, before clipping or inspecting them."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (the grad scaler's scale, for instance)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def teardown(self) -> None:
        pass

    @property
    def skips_nonfinite_steps(self) -> bool:
        """Whether non-finite gradients are expected and handled here (a grad scaler skips that step).

        Then an inf/nan gradient norm is not an error: it is how loss scaling finds its scale.
        """
        return False

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype math runs in."""
        return torch.float32

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
