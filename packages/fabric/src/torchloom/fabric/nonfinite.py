"""NonFiniteGuard for a Fabric loop: catch a loss or gradient that became inf/nan without a host sync per step.

Call ``guard.step_ok(loss, optimizer)`` after ``fabric.backward`` and before ``optimizer.step()``::

    guard = NonFiniteGuard(fabric, mode="stop", check_every_n_steps=32)
    for batch in loader:
        loss = model(batch).mean()
        fabric.backward(loss)
        if guard.step_ok(loss, optimizer):
            optimizer.step()
        optimizer.zero_grad()
    guard.finish()  # checks the last, partial interval

``mode="stop"``: the verdict stays on the device; every ``check_every_n_steps`` calls the ranks agree (one
host sync, one collective) and, if any rank saw inf/nan, every rank raises ``NonFiniteError`` naming the
first bad step and the ranks. ``step_ok`` returns True. ``mode="skip"``: the ranks agree on every call (one
host sync, one collective per step); a bad step's gradients are dropped on every rank and ``step_ok``
returns False. The checks are those of the Trainer's ``NonFiniteGuard`` callback (``torchloom.core.nonfinite``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor
from torch.optim import Optimizer

from torchloom.core.errors import ConfigurationError
from torchloom.core.nonfinite import NonFiniteError, NonFiniteMonitor, all_finite, drop_gradients, gradients_of
from torchloom.core.utils.rank_zero import rank_zero_warn

if TYPE_CHECKING:
    from torchloom.fabric.fabric import Fabric

__all__ = ["NonFiniteError", "NonFiniteGuard"]

_ADVICE = "Lower the learning rate, clip gradients, or use NonFiniteGuard(fabric, mode='skip') to skip such steps."


class NonFiniteGuard:
    """Stops (or skips the step) when a loss or gradient becomes inf/nan; see the module doc for the costs."""

    def __init__(self, fabric: Fabric, mode: str = "stop", check_every_n_steps: int = 32) -> None:
        self._monitor = NonFiniteMonitor(mode, check_every_n_steps, owner="NonFiniteGuard")
        if mode == "skip" and fabric.strategy.requires_joint_setup:
            raise ConfigurationError(
                f"NonFiniteGuard(mode='skip') cannot skip a step under {type(fabric.strategy).__name__}, whose "
                "engine owns the gradients. Valid: mode='stop'."
            )
        self._fabric = fabric
        self.mode = mode
        self.steps = 0  # calls of step_ok so far
        self.skipped_steps = 0

    def step_ok(self, loss: Tensor | Sequence[Tensor] | None, optimizer: Optimizer, step: int | None = None) -> bool:
        """Checks this step's ``loss`` (or the losses of its accumulated micro-batches) and gradients.

        ``step`` names the step in messages (default: the number of earlier calls)."""
        losses = [] if loss is None else [loss] if isinstance(loss, Tensor) else list(loss)
        strategy = self._fabric.strategy
        # a grad scaler's inf gradients are its signal (it skips that step): then watch the loss only
        grads = [] if strategy.precision.skips_nonfinite_steps else gradients_of(optimizer)
        finite = all_finite([*losses, *grads])
        where = f"step {self.steps if step is None else step}"
        self.steps += 1
        if self.mode == "stop":
            self._monitor.record(finite, where)
            if self._monitor.due:
                self._monitor.check(strategy, _ADVICE)
            return True
        if self._monitor.agree(strategy, finite):
            return True
        drop_gradients(optimizer)
        self.skipped_steps += 1
        rank_zero_warn(
            f"NonFiniteGuard skipped {where}: the loss or a gradient was inf/nan on at least one rank "
            f"({self.skipped_steps} skipped so far)."
        )
        return False

    def finish(self) -> None:
        """Checks the steps since the last check (stop mode); call it once the loop ends."""
        if self._monitor.pending:
            self._monitor.check(self._fabric.strategy, _ADVICE)
