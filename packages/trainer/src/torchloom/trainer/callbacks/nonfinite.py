"""NonFiniteGuard: catch a loss or gradient that became inf/nan, without a host sync on every step.

``mode="stop"`` (default): each step's verdict (loss and gradients finite?) stays on the device, in a small
buffer; every ``check_every_n_steps`` steps, and when training ends, the ranks agree on it with one
collective (one host sync), and if any rank saw a non-finite value every rank stops with
``NonFiniteError`` naming the first such step, its epoch and batch, and the ranks. Detection lags by at
most ``check_every_n_steps`` steps; weights may already hold the bad update by then.

``mode="skip"``: every step is checked before the optimizer steps (one host sync and one collective per
step, the price of deciding in time); a step with a non-finite loss or gradient on any rank is skipped on
every rank (its gradients are dropped, so torch optimizers leave those parameters and their state alone),
with a warning naming the step. Not with strategies whose engine owns the gradients (DeepSpeed).

Automatic optimization only: under manual optimization the module calls its optimizers itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.optim import Optimizer

from torchloom.core.errors import ConfigurationError
from torchloom.core.nonfinite import NonFiniteError, NonFiniteMonitor, all_finite, drop_gradients, gradients_of
from torchloom.core.utils.rank_zero import rank_zero_warn
from torchloom.trainer.callbacks.callback import Callback

if TYPE_CHECKING:
    from torchloom.trainer.module import LoomModule
    from torchloom.trainer.trainer import Trainer

__all__ = ["NonFiniteError", "NonFiniteGuard"]

_ADVICE = "Lower the learning rate, clip gradients, or use NonFiniteGuard(mode='skip') to skip such steps."


class NonFiniteGuard(Callback):
    """Stops (or skips the step) when a loss or gradient becomes inf/nan; see the module doc for the costs."""

    def __init__(self, mode: str = "stop", check_every_n_steps: int = 32) -> None:
        self._monitor = NonFiniteMonitor(mode, check_every_n_steps, owner="NonFiniteGuard")
        self.mode = mode
        self.check_every_n_steps = check_every_n_steps
        self._window_loss_ok: Tensor | None = None  # every loss of the accumulation window finite (on the device)
        self.skipped_steps = 0

    def on_fit_start(self, trainer: Trainer, module: LoomModule) -> None:
        if self.mode == "skip" and trainer.strategy.requires_joint_setup:
            raise ConfigurationError(
                f"NonFiniteGuard(mode='skip') cannot skip a step under {type(trainer.strategy).__name__}, whose "
                "engine owns the gradients. Valid: mode='stop'."
            )
        self._window_loss_ok = None
        self._monitor.reset()

    def on_before_backward(self, trainer: Trainer, module: LoomModule, loss: Tensor) -> None:
        self._window_loss_ok = all_finite([loss], self._window_loss_ok)

    def on_before_optimizer_step(self, trainer: Trainer, module: LoomModule, optimizer: Optimizer) -> None:
        # a grad scaler's inf gradients are its signal (it skips that step): then watch the loss only
        grads = [] if trainer.strategy.precision.skips_nonfinite_steps else gradients_of(optimizer)
        finite = all_finite(grads, self._window_loss_ok)
        self._window_loss_ok = None
        step, epoch, batch = trainer.global_step, trainer.current_epoch, trainer._progress.batches_done
        if self.mode == "stop":
            self._monitor.record(finite, f"global step {step} (epoch {epoch}, batch {batch})")
            return
        if self._monitor.agree(trainer.strategy, finite):
            return
        drop_gradients(optimizer)
        self.skipped_steps += 1
        rank_zero_warn(
            f"NonFiniteGuard skipped step {step} (epoch {epoch}, batch {batch}): the loss or a gradient was inf/nan "
            f"on at least one rank ({self.skipped_steps} skipped so far)."
        )

    def on_train_batch_end(
        self, trainer: Trainer, module: LoomModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.mode == "stop" and self._monitor.due:
            self._monitor.check(trainer.strategy, _ADVICE)

    def on_train_end(self, trainer: Trainer, module: LoomModule) -> None:
        if self.mode == "stop" and self._monitor.pending:
            self._monitor.check(trainer.strategy, _ADVICE)
