"""StrategyAdapter: the Trainer's only door to a core strategy; a custom strategy works through it unchanged."""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any

import pytest
import torch
from torch import nn
from typing_extensions import override

from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.precision.amp import MixedPrecision
from torchloom.core.strategies.single_device import SingleDeviceStrategy
from torchloom.trainer.adapter import StrategyAdapter, raw_optimizer
from torchloom.trainer.optimizers import LoomOptimizer

from .engine_models import Regressor, loader, quiet_trainer


class Wrapper(nn.Module):
    """What a strategy might wrap a module in; counts the calls that went through it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args: Any) -> Any:
        self.calls += 1
        return self.module(*args)


class CustomStrategy(SingleDeviceStrategy):
    """A user's strategy: wraps the module and records what the Trainer asked of it."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.events: list[str] = []

    @override
    def setup_environment(self) -> None:
        self.events.append("setup_environment")
        super().setup_environment()

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        self.events.append("setup_module")
        return Wrapper(module)

    @override
    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        inner = module.module if isinstance(module, Wrapper) else module
        return inner.state_dict()

    @override
    def optimizer_step(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Any:
        self.events.append("optimizer_step")
        return super().optimizer_step(optimizer, **kwargs)

    @override
    @contextlib.contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Generator[None, None, None]:
        self.events.append(f"no_backward_sync({type(module).__name__})")
        yield

    @override
    def teardown(self) -> None:
        self.events.append("teardown")
        super().teardown()


def test_a_custom_strategy_runs_the_whole_fit_through_its_own_methods() -> None:
    strategy = CustomStrategy()
    trainer = quiet_trainer(strategy=strategy, max_epochs=1, accumulate_grad_batches=2, num_sanity_val_steps=0)
    model = Regressor()
    trainer.fit(model, loader(16), loader(4))
    assert strategy.events[:2] == ["setup_environment", "setup_module"] and strategy.events[-1] == "teardown"
    assert strategy.events.count("optimizer_step") == 2 and strategy.events.count("no_backward_sync(Wrapper)") == 2
    assert trainer.global_step == 2


def test_call_step_goes_through_the_wrapper_in_the_precision_context() -> None:
    strategy = SingleDeviceStrategy("cpu", precision=MixedPrecision("bf16-mixed"))
    adapter = StrategyAdapter(strategy)
    module = Regressor()
    wrapper = Wrapper(module)
    strategy.setup_module = lambda m: wrapper  # type: ignore[method-assign,assignment]
    adapter.setup(module, [])
    seen: dict[str, Any] = {}

    def step(batch: Any, batch_idx: int) -> torch.Tensor:
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        output: torch.Tensor = module.layer(batch)
        return output

    module.__dict__["custom_step"] = step
    output = adapter.call_step("custom_step", torch.ones(2, 4), 0)
    assert wrapper.calls == 1 and seen["autocast"] and output.dtype == torch.float32  # converted back


def test_optimizer_step_runs_the_closure_then_the_before_hook_then_steps() -> None:
    adapter = StrategyAdapter(SingleDeviceStrategy("cpu"))
    module = Regressor()
    adapter.setup(module, [])
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    order: list[str] = []
    adapter.before_optimizer_step = lambda o: order.append(f"before {o is optimizer}")
    adapter.after_optimizer_step = lambda o: order.append("after")

    def closure() -> torch.Tensor:
        order.append("closure")
        loss: torch.Tensor = module(torch.ones(2, 4)).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    wrapped = LoomOptimizer(optimizer, module)
    assert raw_optimizer(wrapped) is optimizer and raw_optimizer(optimizer) is optimizer
    before = module.head.weight.detach().clone()
    adapter.optimizer_step(wrapped, closure=closure)
    assert order == ["closure", "before True", "after"] and not torch.equal(before, module.head.weight)
    order.clear()
    adapter.optimizer_step(optimizer)
    assert order == ["before True", "after"]


def test_clip_gradients_by_norm_and_by_value() -> None:
    adapter = StrategyAdapter(SingleDeviceStrategy("cpu"))
    module = Regressor()
    adapter.setup(module, [])
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    (module(torch.ones(4, 4)).sum() * 100).backward()
    assert adapter.clip_gradients(optimizer, None) is None
    norm = adapter.clip_gradients(optimizer, 0.5, "norm")
    assert norm is not None and norm > 0.5
    after = torch.norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]))
    assert after == pytest.approx(0.5, rel=1e-4)
    adapter.clip_gradients(LoomOptimizer(optimizer, module), 0.01, "value")
    assert all(p.grad.abs().max() <= 0.01 for p in module.parameters() if p.grad is not None)


def test_launch_without_a_launcher_runs_here_after_setting_up_the_environment() -> None:
    strategy = CustomStrategy()
    strategy.accelerator = CPUAccelerator()
    adapter = StrategyAdapter(strategy)
    assert adapter.launch(lambda a, b: a + b, 2, 3) == 5
    assert strategy.events == ["setup_environment"]
    assert not adapter.is_distributed and adapter.world_size == 1 and adapter.global_rank == 0
    with pytest.raises(RuntimeError, match="no module yet"):
        adapter.call_step("training_step", 1, 0)
