"""Fabric's NonFiniteGuard: a hand-written loop stops naming the first inf/nan step, or skips exactly that step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.processes import explain, run_python
from torchloom.core.errors import ConfigurationError
from torchloom.fabric import Fabric, NonFiniteError, NonFiniteGuard


def train(
    fabric: Fabric, guard: NonFiniteGuard | None, nan_at: int = -1, grad_only: bool = False, no_grad_at: int = -1
) -> nn.Module:
    """12 SGD steps of a linear layer; step ``nan_at`` turns the loss (or only a gradient) NaN, and step
    ``no_grad_at`` has no gradients at all (the reference for a skipped step)."""
    torch.manual_seed(0)
    model = fabric.setup_module(nn.Linear(3, 1))
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.05))
    generator = torch.Generator().manual_seed(1)
    for step in range(12):
        x = torch.randn(4, 3, generator=generator)
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        if step == nan_at:  # sqrt(0) = 0 keeps the loss finite; its gradient 0 * inf is nan
            loss = loss + (model.weight * 0).abs().sqrt().sum() if grad_only else loss * math.nan
        if step != no_grad_at:
            fabric.backward(loss)
        if guard is None or guard.step_ok(loss, optimizer):
            optimizer.step()
        optimizer.zero_grad()
    if guard is not None:
        guard.finish()
    return model


def cpu_fabric() -> Fabric:
    return Fabric(accelerator="cpu", devices=1)


def test_stop_names_the_first_bad_step_at_the_next_check() -> None:
    fabric = cpu_fabric()
    guard = NonFiniteGuard(fabric, "stop", check_every_n_steps=4)
    with pytest.raises(NonFiniteError, match=r"inf/nan at step 5 on rank\(s\) \[0\].*checked every 4 steps"):
        train(fabric, guard, nan_at=5)
    assert guard.steps == 8  # found at the second check, not the step itself: no host sync per step


def test_stop_catches_a_nan_gradient_behind_a_finite_loss_at_finish() -> None:
    fabric = cpu_fabric()
    with pytest.raises(NonFiniteError, match=r"at step 10 on rank\(s\) \[0\]"):
        train(fabric, NonFiniteGuard(fabric, "stop", check_every_n_steps=100), nan_at=10, grad_only=True)


def test_a_healthy_loop_is_left_alone() -> None:
    fabric = cpu_fabric()
    guard = NonFiniteGuard(fabric, "stop", check_every_n_steps=5)
    guarded = train(fabric, guard)
    plain = train(cpu_fabric(), None)
    assert guard.steps == 12 and guard.skipped_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(guarded.parameters(), plain.parameters()))


@pytest.mark.parametrize("grad_only", [False, True])
def test_skip_drops_exactly_the_bad_step(grad_only: bool) -> None:
    fabric = cpu_fabric()
    guard = NonFiniteGuard(fabric, "skip")
    with pytest.warns(UserWarning, match=r"NonFiniteGuard skipped step 3: the loss or a gradient was inf/nan"):
        guarded = train(fabric, guard, nan_at=3, grad_only=grad_only)
    reference = train(cpu_fabric(), None, no_grad_at=3)
    assert guard.skipped_steps == 1
    for mine, theirs in zip(guarded.parameters(), reference.parameters()):
        assert torch.isfinite(mine).all() and torch.equal(mine, theirs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"mode": "warn"}, r"NonFiniteGuard\(mode='warn'\) is not valid. Valid: 'stop', 'skip'"),
     ({"check_every_n_steps": 0}, r"check_every_n_steps=0\) is not valid. Valid: an int >= 1"),
     ({"check_every_n_steps": True}, r"check_every_n_steps=True\) is not valid")],
)  # fmt: skip
def test_bad_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        NonFiniteGuard(cpu_fabric(), **kwargs)


@pytest.mark.slow
def test_two_ddp_ranks_stop_together_when_one_sees_a_nan(tmp_path: Path) -> None:
    """Only rank 1's loss is NaN (DDP then averages it into both ranks' gradients): both ranks raise at the same
    check, and nobody waits in a collective."""
    process = run_python(Path(__file__).with_name("nonfinite_fabric_job.py"), str(tmp_path), timeout=180)
    assert process.returncode == 0, explain(process)
    messages = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    for message in messages:
        assert message.startswith("NonFiniteError: The loss or a gradient became inf/nan at step 5"), messages
    assert "on rank(s) [0, 1]" in messages[0] and messages[0] == messages[1]
