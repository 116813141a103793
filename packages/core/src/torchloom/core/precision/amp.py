"""``"16-mixed"`` and ``"bf16-mixed"``: float32 parameters, forward pass under ``torch.autocast``.

``"16-mixed"`` computes in float16, whose small range lets gradients underflow, so it owns a
``torch.amp.GradScaler``: the loss is scaled up before backward, gradients are unscaled before the
step, and a step whose gradients hold inf/nan is skipped while the scale backs off.
``"bf16-mixed"`` computes in bfloat16, which has float32's range and needs no scaler.

Both work on the CPU too (fp16 autocast and ``GradScaler("cpu")`` are real in torch >= 2.3); we do not
swap ``"16-mixed"`` for bf16 behind the user's back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.amp import GradScaler
from torch.optim import Optimizer
from typing_extensions import override

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.precision.precision import Precision
from torchloom.core.utils.collections import apply_to_collection

__all__ = ["MixedPrecision"]

_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
_DEVICE_TYPES = ("cpu", "cuda", "mps")


class MixedPrecision(Precision):
    """Autocast to float16 (with a grad scaler) or bfloat16 on ``device_type`` ("cpu", "cuda" or "mps").

    ``scaler`` replaces the default ``GradScaler(device_type)`` of ``"16-mixed"`` (to tune its
    growth or start scale); ``"bf16-mixed"`` takes none. The connector sets ``device_type`` from the
    accelerator; setting it rebuilds a default scaler for that device.
    """

    def __init__(
        self,
        dtype: Literal["16-mixed", "bf16-mixed"],
        device_type: str = "cpu",
        scaler: GradScaler | None = None,
    ) -> None:
        if not isinstance(dtype, str) or dtype not in _DTYPES:  # a list or dict is not hashable
            raise ConfigurationError(f"MixedPrecision(dtype={dtype!r}) is not supported. Valid: {choices(_DTYPES)}.")
        if scaler is not None and not isinstance(scaler, GradScaler):
            raise ConfigurationError(
                f"MixedPrecision(scaler={scaler!r}) is not valid. Valid: None (a default one for '16-mixed'), or a "
                "torch.amp.GradScaler."
            )
        if dtype == "bf16-mixed" and scaler is not None:
            raise ConfigurationError(
                "MixedPrecision(dtype='bf16-mixed') takes no scaler: bfloat16 has float32's range, so there is "
                "nothing to scale. Drop scaler=, or use dtype='16-mixed'."
            )
        self.name = dtype
        self._dtype = _DTYPES[dtype]
        self._device_type = _check_device_type(device_type)
        self._owns_scaler = scaler is None
        self.scaler: GradScaler | None = scaler
        if self.scaler is None and dtype == "16-mixed":
            self.scaler = GradScaler(self._device_type)
        # optimizers whose gradients were unscaled since their last step: GradScaler refuses a second unscale_
        self._unscaled: set[int] = set()

    @property
    def device_type(self) -> str:
        return self._device_type

    @device_type.setter
    def device_type(self, device_type: str) -> None:
        device_type = _check_device_type(device_type)
        if device_type != self._device_type and self._owns_scaler and self.scaler is not None:
            self.scaler = GradScaler(device_type)
        self._device_type = device_type

    @override
    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        with torch.autocast(self._device_type, dtype=self._dtype):
            yield

    # Inputs stay as they are: autocast picks each op's dtype, and ops it keeps in float32 (losses,
    # softmax, norms) would only lose precision if the inputs were cast down first.

    @override
    def convert_output(self, data: Any) -> Any:
        def to_float32(tensor: Tensor) -> Tensor:
            return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor

        return apply_to_collection(data, Tensor, to_float32)

    @override
    def pre_backward(self, tensor: Tensor, module: nn.Module | None) -> Tensor:
        return self.scaler.scale(tensor) if self.scaler is not None else tensor

    @override
    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        """Steps ``optimizer`` through the scaler: unscales if not done yet, skips the step on inf/nan."""
        if self.scaler is None:
            return super().optimizer_step(optimizer, **kwargs)
        closure = kwargs.pop("closure", None)
        if closure is not None:  # GradScaler.step cannot take a closure; run it (forward + backward) first
            closure()
        result = self.scaler.step(optimizer, **kwargs)
        self._unscaled.discard(id(optimizer))
        # With several optimizers, update once all the ones already unscaled have stepped: update()
        # forgets which optimizers were unscaled, and a second unscale would divide their gradients twice.
        if not self._unscaled:
            self.scaler.update()
        return result

    @override
    def unscale_gradients(self, optimizer: Optimizer) -> None:
        """Divides ``optimizer``'s gradients by the loss scale; a no-op after the first call before its step."""
        if self.scaler is None or id(optimizer) in self._unscaled:
            return
        self.scaler.unscale_(optimizer)
        self._unscaled.add(id(optimizer))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state_dict:
            self.scaler.load_state_dict(state_dict["scaler"])

    @property
    @override
    def skips_nonfinite_steps(self) -> bool:
        return self.scaler is not None

    @property
    @override
    def compute_dtype(self) -> torch.dtype:
        return self._dtype

    @override
    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, device_type={self._device_type!r})"


def _check_device_type(device_type: str) -> str:
    if device_type not in _DEVICE_TYPES:
        raise ConfigurationError(
            f"MixedPrecision(device_type={device_type!r}) is not supported. Valid: {choices(_DEVICE_TYPES)}."
        )
    return device_type
