"""Real strategies and loggers that also record what Fabric asked of them (for single-process tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torchloom.core.loggers.logger import HParamValue, Logger
from torchloom.core.strategies.single_device import SingleDeviceStrategy


class RecordingStrategy(SingleDeviceStrategy):
    """A CPU single-device strategy that logs its calls in ``self.calls`` and does the real work."""

    def __init__(self, local_rank: int = 0, **kwargs: Any) -> None:
        super().__init__("cpu", **kwargs)
        self.calls: list[tuple[Any, ...]] = []
        self._fake_local_rank = local_rank

    @property
    def local_rank(self) -> int:
        return self._fake_local_rank

    def setup_environment(self) -> None:
        self.calls.append(("setup_environment",))
        super().setup_environment()

    def module_to_device(self, module: nn.Module) -> None:
        self.calls.append(("module_to_device", module))
        super().module_to_device(module)

    def batch_to_device(self, batch: Any, device: torch.device | None = None) -> Any:
        self.calls.append(("batch_to_device", device))
        return super().batch_to_device(batch, device)

    def backward(self, tensor: Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("backward", module, args, kwargs))
        super().backward(tensor, module, *args, **kwargs)

    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        self.calls.append(("optimizer_step", optimizer, kwargs))
        return super().optimizer_step(optimizer, **kwargs)

    @contextlib.contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Generator[None, None, None]:
        self.calls.append(("no_backward_sync", module, enabled))
        yield

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]


class JointStrategy(RecordingStrategy):
    """Declares that modules and optimizers must be set up together (as DeepSpeed does)."""

    requires_joint_setup = True


class SplittingStrategy(RecordingStrategy):
    """A single process that nevertheless asks for a data split: this process is rank 1 of 2."""

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": 2, "rank": 1}


class RecordingLogger(Logger):
    def __init__(self, root_dir: str = ".") -> None:
        super().__init__(root_dir, name="recording", version=0)
        self.metrics: list[tuple[dict[str, float], int]] = []
        self.saves = 0

    def _write_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((metrics, step))

    def _write_hyperparams(self, params: dict[str, HParamValue], metric_names: list[str]) -> None:
        pass

    def _save(self) -> None:
        self.saves += 1
