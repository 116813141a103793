"""Catching a loss or gradient that became inf/nan, shared by the Trainer's callback and Fabric's guard.

A step's verdict (its losses and gradients all finite?) is one bool tensor computed on the device, so
recording it costs no host sync. ``NonFiniteMonitor`` then either

- keeps the verdicts and has the ranks agree on them every N steps (``check``: one host sync and one
  collective per interval), raising ``NonFiniteError`` on every rank with the first bad step, or
- decides at once (``agree``: one host sync and one collective per step), so the step can be skipped.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from torchloom.core.errors import ConfigurationError, TorchloomError, choices
from torchloom.core.strategies.strategy import Strategy

__all__ = ["MODES", "NonFiniteError", "NonFiniteMonitor", "all_finite", "drop_gradients", "gradients_of"]

MODES = ("stop", "skip")


class NonFiniteError(TorchloomError, RuntimeError):
    """A loss or gradient became inf/nan during training (raised on every rank at once)."""


def gradients_of(optimizer: Optimizer) -> list[Tensor]:
    """The gradients ``optimizer`` would apply; a DTensor's local shard (each rank checks its own)."""
    grads = []
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.grad is not None:
                to_local = getattr(parameter.grad, "to_local", None)
                grads.append(to_local() if callable(to_local) else parameter.grad)
    return grads


def drop_gradients(optimizer: Optimizer) -> None:
    """Skips the coming step: torch optimizers leave parameters without a gradient (and their state) alone."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            parameter.grad = None


def all_finite(tensors: Iterable[Tensor], verdict: Tensor | None = None) -> Tensor:
    """One bool tensor on the device: every element of ``tensors`` finite, and ``verdict`` (no host sync).

    Element-wise, not through a norm: a norm of large float16 values could overflow and raise a false alarm."""
    checks = [torch.isfinite(tensor.detach()).all() for tensor in tensors]
    result = verdict if verdict is not None else torch.tensor(True)
    if checks:
        stacked = torch.stack(checks).all()
        result = result.to(stacked.device) & stacked
    return result


class NonFiniteMonitor:
    """Per-step verdicts, checked together every ``check_every_n_steps`` steps (``check``) or at once (``agree``)."""

    def __init__(self, mode: str, check_every_n_steps: int, owner: str) -> None:
        if mode not in MODES:
            raise ConfigurationError(f"{owner}(mode={mode!r}) is not valid. Valid: {choices(MODES)}.")
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) or check_every_n_steps < 1:
            raise ConfigurationError(
                f"{owner}(check_every_n_steps={check_every_n_steps!r}) is not valid. Valid: an int >= 1."
            )
        self.mode = mode
        self.check_every_n_steps = check_every_n_steps
        self._verdicts: list[Tensor] = []
        self._where: list[str] = []  # how each verdict's step is named in the error

    def reset(self) -> None:
        self._verdicts, self._where = [], []

    def record(self, finite: Tensor, where: str) -> None:
        """Keeps a step's verdict (stop mode); nothing leaves the device."""
        self._verdicts.append(finite)
        self._where.append(where)

    @property
    def due(self) -> bool:
        return len(self._verdicts) >= self.check_every_n_steps

    @property
    def pending(self) -> bool:
        return bool(self._verdicts)

    def agree(self, strategy: Strategy, finite: Tensor) -> bool:
        """Whether the step was finite on every rank (skip mode; the same answer everywhere)."""
        return strategy.reduce_boolean_decision(bool(finite), all=True)

    def check(self, strategy: Strategy, advice: str) -> None:
        """``NonFiniteError`` on every rank if any rank recorded a non-finite step since the last check."""
        verdicts, where = torch.stack(self._verdicts), self._where
        self.reset()
        local_ok = bool(verdicts.all())  # the one host sync of the interval
        if strategy.reduce_boolean_decision(local_ok, all=True):
            return
        first = -1 if local_ok else int((~verdicts).nonzero()[0, 0])
        gathered = strategy.all_gather(torch.tensor([first], device=verdicts.device))
        firsts = [int(value) for value in gathered.reshape(-1).tolist()]
        bad_ranks = [rank for rank, index in enumerate(firsts) if index >= 0]
        index = min(firsts[rank] for rank in bad_ranks)
        raise NonFiniteError(
            f"The loss or a gradient became inf/nan at {where[index]} on rank(s) {bad_ranks}; training stopped "
            f"(checked every {self.check_every_n_steps} steps). {advice}"
        )
