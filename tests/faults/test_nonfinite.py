"""NonFiniteGuard: a loss or gradient that becomes inf/nan stops training naming where (or the step is skipped)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.processes import explain, run_python
from torchloom.core.errors import ConfigurationError
from torchloom.trainer import LoomModule, Trainer
from torchloom.trainer.callbacks import NonFiniteError, NonFiniteGuard

QUIET: dict[str, Any] = {
    "accelerator": "cpu",
    "logger": False,
    "enable_progress_bar": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}


def loader(n: int = 64, batch_size: int = 4) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=batch_size)


class Regressor(LoomModule):
    """Trains a linear layer; at ``nan_at_step`` its loss (or only a gradient, ``grad_only``) turns NaN.

    ``skip_at_step``: return no loss at that step instead (the Trainer then steps without gradients)."""

    def __init__(
        self, nan_at_step: int = -1, grad_only: bool = False, skip_at_step: int = -1, nan_on_rank: int = -1
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 1)
        self.nan_at_step, self.grad_only, self.skip_at_step, self.nan_on_rank = (
            nan_at_step, grad_only, skip_at_step, nan_on_rank,
        )  # fmt: skip

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.trainer.global_step == self.skip_at_step:
            return None
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        bad = self.trainer.global_step == self.nan_at_step and self.nan_on_rank in (-1, self.trainer.global_rank)
        if bad and self.grad_only:  # sqrt(0) = 0 keeps the loss finite; its gradient 0 * inf is nan
            return loss + (self.layer.weight * 0).abs().sqrt().sum()
        return loss * math.nan if bad else loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_stop_names_the_step_epoch_batch_and_rank_within_the_check_interval() -> None:
    module = Regressor(nan_at_step=5)
    checked: list[int] = []

    guard = NonFiniteGuard("stop", check_every_n_steps=4)
    trainer = Trainer(max_epochs=1, callbacks=[guard], **QUIET)
    check = guard._monitor.check

    def spy(strategy: Any, advice: str) -> None:
        checked.append(trainer.global_step)
        check(strategy, advice)

    guard._monitor.check = spy  # type: ignore[method-assign]
    with pytest.raises(NonFiniteError, match=r"at global step 5 \(epoch 0, batch 5\) on rank\(s\) \[0\]"):
        trainer.fit(module, loader())
    assert checked == [4, 8]  # one host sync per 4 steps; the NaN of step 5 is found at the second check


def test_stop_catches_a_gradient_that_is_nan_while_the_loss_is_finite() -> None:
    trainer = Trainer(max_epochs=1, callbacks=[NonFiniteGuard("stop", check_every_n_steps=100)], **QUIET)
    with pytest.raises(NonFiniteError, match=r"at global step 3 \(epoch 0, batch 3\)"):
        trainer.fit(Regressor(nan_at_step=3, grad_only=True), loader())  # found by the check at the end of training


def test_a_healthy_run_is_left_alone() -> None:
    guard = NonFiniteGuard("stop", check_every_n_steps=3)
    trainer = Trainer(max_epochs=2, callbacks=[guard], **QUIET)
    trainer.fit(Regressor(), loader())
    assert trainer.global_step == 32 and guard.skipped_steps == 0


@pytest.mark.parametrize("grad_only", [False, True])
def test_skip_drops_exactly_the_bad_step(grad_only: bool) -> None:
    """The weights equal a run where that step had no gradients at all, and are finite."""
    guard = NonFiniteGuard("skip")
    guarded = Regressor(nan_at_step=3, grad_only=grad_only)
    with pytest.warns(UserWarning, match=r"NonFiniteGuard skipped step 3 \(epoch 0, batch 3\)"):
        Trainer(max_epochs=1, callbacks=[guard], **QUIET).fit(guarded, loader())
    reference = Regressor(skip_at_step=3)
    Trainer(max_epochs=1, **QUIET).fit(reference, loader())
    assert guard.skipped_steps == 1
    for mine, theirs in zip(guarded.parameters(), reference.parameters()):
        assert torch.isfinite(mine).all() and torch.equal(mine, theirs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"mode": "warn"}, r"NonFiniteGuard\(mode='warn'\) is not valid. Valid: 'stop', 'skip'"),
     ({"check_every_n_steps": 0}, r"check_every_n_steps=0\) is not valid")],
)  # fmt: skip
def test_bad_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        NonFiniteGuard(**kwargs)


@pytest.mark.slow
def test_two_ddp_ranks_stop_together_when_one_sees_a_nan(tmp_path: Path) -> None:
    """Only rank 1's loss is NaN (DDP then averages it into both ranks' gradients): both ranks raise at the same
    check instead of one raising and the other waiting in the next collective."""
    process = run_python(Path(__file__).with_name("nonfinite_job.py"), str(tmp_path), timeout=180)
    messages = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert process.returncode == 0, explain(process)
    for message in messages:
        assert message.startswith("NonFiniteError: The loss or a gradient became inf/nan at global step 5"), messages
    assert "on rank(s) [0, 1]" in messages[0] and messages[0] == messages[1]
