"""FSDPPrecision: the precisions FSDP runs, and the ``MixedPrecisionPolicy`` each one gives ``fully_shard``.

FSDP keeps the sharded parameters in their stored dtype and casts them when it gathers them, so a
mixed precision is mostly FSDP's job: ``"bf16-mixed"`` gathers bfloat16 parameters and reduces
gradients in float32 (the stored parameters, and so the optimizer, stay float32). The forward pass
still runs under autocast, which keeps the ops that need float32 (softmax, losses) in float32.
``"16-mixed"`` does the same in float16 with a ``torch.amp.GradScaler``; it works on DTensor
gradients as they are (the scaler's inf check is reduced over all shards, so every rank skips the
same steps). ``"*-true"`` precisions store the parameters in their dtype; no policy is needed.

Every hook is the matching plain precision's (``MixedPrecision``, ``HalfPrecision``, ...), held inside.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.amp import GradScaler
from torch.optim import Optimizer
from typing_extensions import override

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.precision.amp import MixedPrecision
from torchloom.core.precision.double import DoublePrecision
from torchloom.core.precision.half import HalfPrecision
from torchloom.core.precision.precision import Precision

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

__all__ = ["FSDP_PRECISIONS", "FSDPPrecision"]

FSDP_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
_MIXED_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class FSDPPrecision(Precision):
    """One of ``FSDP_PRECISIONS`` for ``FSDPStrategy``; ``device_type`` and ``scaler`` as for ``MixedPrecision``."""

    def __init__(self, name: str = "32-true", device_type: str = "cpu", scaler: GradScaler | None = None) -> None:
        if name not in FSDP_PRECISIONS:
            raise ConfigurationError(f"FSDPPrecision({name!r}) is not supported. Valid: {choices(FSDP_PRECISIONS)}.")
        if scaler is not None and name != "16-mixed":
            raise ConfigurationError(f"FSDPPrecision({name!r}) takes no scaler; only '16-mixed' scales the loss.")
        self.name = name
        self._inner: Precision
        if name in _MIXED_DTYPES:
            self._inner = MixedPrecision(name, device_type=device_type, scaler=scaler)  # type: ignore[arg-type]
        elif name in ("bf16-true", "16-true"):
            self._inner = HalfPrecision(name)  # type: ignore[arg-type]
        elif name == "64-true":
            self._inner = DoublePrecision()
        else:
            self._inner = Precision()

    @property
    def mixed_precision_policy(self) -> MixedPrecisionPolicy:
        """What ``fully_shard`` gathers parameters in and reduces gradients in, for this precision."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        dtype = _MIXED_DTYPES.get(self.name)
        if dtype is None:  # the stored dtype is the compute dtype
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)

    @property
    def device_type(self) -> str:
        """The device type autocast targets (mixed precisions); the connector sets it from the devices."""
        return getattr(self._inner, "device_type", "cpu")

    @device_type.setter
    def device_type(self, device_type: str) -> None:
        if isinstance(self._inner, MixedPrecision):
            self._inner.device_type = device_type

    @property
    def scaler(self) -> GradScaler | None:
        return getattr(self._inner, "scaler", None)

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        return self._inner.convert_module(module)

    @override
    @contextmanager
    def module_init_context(self) -> Generator[None, None, None]:
        with self._inner.module_init_context():
            yield

    @override
    @contextmanager
    def tensor_init_context(self) -> Generator[None, None, None]:
        with self._inner.tensor_init_context():
            yield

    @override
    @contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        with self._inner.forward_context():
            yield

    @override
    def convert_input(self, data: Any) -> Any:
        return self._inner.convert_input(data)

    @override
    def convert_output(self, data: Any) -> Any:
        return self._inner.convert_output(data)

    @override
    def pre_backward(self, tensor: Tensor, module: nn.Module | None) -> Tensor:
        return self._inner.pre_backward(tensor, module)

    @override
    def backward(self, tensor: Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        self._inner.backward(tensor, module, *args, **kwargs)

    @override
    def post_backward(self, tensor: Tensor, module: nn.Module | None) -> Tensor:
        return self._inner.post_backward(tensor, module)

    @override
    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        return self._inner.optimizer_step(optimizer, **kwargs)

    @override
    def unscale_gradients(self, optimizer: Optimizer) -> None:
        self._inner.unscale_gradients(optimizer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._inner.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._inner.load_state_dict(state_dict)

    @override
    def teardown(self) -> None:
        self._inner.teardown()

    @property
    @override
    def skips_nonfinite_steps(self) -> bool:
        return self._inner.skips_nonfinite_steps

    @property
    @override
    def compute_dtype(self) -> torch.dtype:
        return self._inner.compute_dtype

    @override
    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, device_type={self.device_type!r})"

    @classmethod
    def from_precision(cls, precision: Precision) -> FSDPPrecision:
        """The FSDP variant of a plain precision (its device type and grad scaler kept); refuses other kinds."""
        if isinstance(precision, FSDPPrecision):
            return precision
        plain = (Precision, MixedPrecision, HalfPrecision, DoublePrecision)
        if type(precision) not in plain or precision.name not in FSDP_PRECISIONS:
            raise ConfigurationError(
                f"FSDPStrategy cannot run precision={precision!r}. Valid: {choices(FSDP_PRECISIONS)}, or an "
                "FSDPPrecision (subclass it to customise one)."
            )
        # a user's own scaler carries over; a default one is rebuilt for the device type
        scaler = precision.scaler if isinstance(precision, MixedPrecision) and not precision._owns_scaler else None
        return cls(precision.name, device_type=getattr(precision, "device_type", "cpu"), scaler=scaler)
