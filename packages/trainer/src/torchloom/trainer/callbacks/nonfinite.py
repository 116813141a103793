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

import torch
from torch import Tensor
from torch.optim import Optimizer

from torchloom.core.errors import ConfigurationError, TorchloomError, choices
from torchloom.core.utils.rank_zero import rank_zero_warn
from torchloom.trainer.callbacks.callback import Callback

if TYPE_CHECKING:
    from torchloom.trainer.module import LoomModule
    from torchloom.trainer.trainer import Trainer

__all__ = ["NonFiniteError", "NonFiniteGuard"]

MODES = ("stop", "skip")


class NonFiniteError(TorchloomError, RuntimeError):
    """A loss or gradient became inf/nan during training (raised on every rank at once)."""


class NonFiniteGuard(Callback):
    """Stops (or skips the step) when a loss or gradient becomes inf/nan; see the module doc for the costs."""

    def __init__(self, mode: str = "stop", check_every_n_steps: int = 32) -> None:
        if mode not in MODES:
            raise ConfigurationError(f"NonFiniteGuard(mode={mode!r}) is not valid. Valid: {choices(MODES)}.")
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) or check_every_n_steps < 1:
            raise ConfigurationError(
                f"NonFiniteGuard(check_every_n_steps={check_every_n_steps!r}) is not valid. Valid: an int >= 1."
            )
        self.mode = mode
        self.check_every_n_steps = check_every_n_steps
        self._window_loss_ok: Tensor | None = None  # every loss of the accumulation window finite (on the device)
        self._verdicts: list[Tensor] = []  # stop mode: one bool tensor per step since the last check
        self._where: list[tuple[int, int, int]] = []  # (global step, epoch, batch index) of each verdict
        self.skipped_steps = 0

    def on_fit_start(self, trainer: Trainer, module: LoomModule) -> None:
        if self.mode == "skip" and trainer.strategy.requires_joint_setup:
            raise ConfigurationError(
                f"NonFiniteGuard(mode='skip') cannot skip a step under {type(trainer.strategy).__name__}, whose "
                "engine owns the gradients. Valid: mode='stop'."
            )
        self._window_loss_ok, self._verdicts, self._where = None, [], []

    def on_before_backward(self, trainer: Trainer, module: LoomModule, loss: Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._window_loss_ok = finite if self._window_loss_ok is None else self._window_loss_ok & finite

    def on_before_optimizer_step(self, trainer: Trainer, module: LoomModule, optimizer: Optimizer) -> None:
        grads = [_local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if trainer.strategy.precision.skips_nonfinite_steps:
            grads = []  # a grad scaler's inf gradients are its signal (it skips that step): watch the loss only
        finite = _all_finite(grads, self._window_loss_ok)
        self._window_loss_ok = None
        step, epoch, batch = trainer.global_step, trainer.current_epoch, trainer._progress.batches_done
        if self.mode == "stop":
            self._verdicts.append(finite)
            self._where.append((step, epoch, batch))
            return
        if trainer.strategy.reduce_boolean_decision(bool(finite), all=True):
            return
        for group in optimizer.param_groups:  # torch optimizers skip parameters without a gradient
            for parameter in group["params"]:
                parameter.grad = None
        self.skipped_steps += 1
        rank_zero_warn(
            f"NonFiniteGuard skipped step {step} (epoch {epoch}, batch {batch}): the loss or a gradient was inf/nan "
            f"on at least one rank ({self.skipped_steps} skipped so far)."
        )

    def on_train_batch_end(
        self, trainer: Trainer, module: LoomModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.mode == "stop" and len(self._verdicts) >= self.check_every_n_steps:
            self._check(trainer)

    def on_train_end(self, trainer: Trainer, module: LoomModule) -> None:
        if self.mode == "stop" and self._verdicts:
            self._check(trainer)

    def _check(self, trainer: Trainer) -> None:
        verdicts, where = torch.stack(self._verdicts), self._where
        self._verdicts, self._where = [], []
        local_ok = bool(verdicts.all())  # the one host sync of the interval
        if trainer.strategy.reduce_boolean_decision(local_ok, all=True):
            return
        first = -1 if local_ok else int((~verdicts).nonzero()[0, 0])
        gathered = trainer.strategy.all_gather(torch.tensor([first], device=verdicts.device))
        firsts = [int(value) for value in gathered.reshape(-1).tolist()]
        bad_ranks = [rank for rank, index in enumerate(firsts) if index >= 0]
        index = min(firsts[rank] for rank in bad_ranks)
        step, epoch, batch = where[index]
        raise NonFiniteError(
            f"The loss or a gradient became inf/nan at global step {step} (epoch {epoch}, batch {batch}) on rank(s) "
            f"{bad_ranks}; training stopped (checked every {self.check_every_n_steps} steps). Lower the learning "
            "rate, clip gradients, or use NonFiniteGuard(mode='skip') to skip such steps."
        )


def _local(tensor: Tensor) -> Tensor:
    """A DTensor's local shard (every rank checks its own; the ranks then agree), a plain tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _all_finite(grads: list[Tensor], loss_ok: Tensor | None) -> Tensor:
    """One bool tensor on the device: every gradient element and the window's losses finite (no host sync)."""
    verdict = loss_ok if loss_ok is not None else torch.tensor(True)
    if grads:  # element-wise (a norm of large float16 values could overflow and raise a false alarm)
        grads_ok = torch.stack([torch.isfinite(grad).all() for grad in grads]).all()
        verdict = verdict.to(grads_ok.device) & grads_ok
    return verdict
