"""One training batch: automatic optimization (closure, accumulation, clipping) or manual optimization.

Automatic optimization, for a batch that ends an accumulation window (every
``accumulate_grad_batches``-th batch, or the epoch's last)::

    optimizer_step(epoch, batch_idx, optimizer, closure)      # module hook; default: optimizer.step(closure)
      closure: training_step -> on_before_backward -> backward(loss / accumulate) -> on_after_backward
               -> on_before_optimizer_step -> configure_gradient_clipping
      the strategy's (precision's) step
    step-interval schedulers, then on_before_zero_grad -> optimizer_zero_grad

A batch inside a window runs the closure's first part only, under the strategy's ``no_backward_sync``
(so DDP averages gradients once per window). ``training_step`` returning ``None`` skips backward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.optim import Optimizer

from torchloom.core.errors import ConfigurationError
from torchloom.trainer.optimizers import step_schedulers

if TYPE_CHECKING:
    from torchloom.trainer.trainer import Trainer

__all__ = ["AutomaticOptimization", "ManualOptimization", "loss_of"]


def loss_of(output: Any) -> Tensor | None:
    """The loss in what ``training_step`` returned: the tensor itself, ``output["loss"]``, or ``None``."""
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        loss: Tensor = output["loss"]
        return loss
    raise ConfigurationError(
        f"training_step returned {output!r}. Valid: a loss tensor, a dict with a 'loss' tensor, or None to skip "
        "the batch."
    )


def detached(output: Any) -> Any:
    """What ``on_train_batch_end`` receives: the step's output with the loss out of the graph."""
    if isinstance(output, Tensor):
        return output.detach()
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return {**output, "loss": output["loss"].detach()}
    return output


class AutomaticOptimization:
    """The Trainer calls backward and steps the (single) optimizer for the module."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.skip_step_hooks = False  # the closure's training_step returned None

    def run(self, batch: Any, batch_idx: int, ends_window: bool) -> Any:
        trainer = self.trainer
        result: dict[str, Any] = {}

        def closure() -> Tensor | None:
            loss = self._forward_backward(batch, batch_idx, result)
            return None if loss is None else loss.detach()

        if not ends_window:
            with trainer._adapter.no_backward_sync():
                closure()
            return detached(result.get("output"))
        raw = trainer.optimizers[0]
        # the module's step hooks get LoomOptimizers; the base's hooks are done here directly, as they would do it
        if trainer._overrides("optimizer_step"):
            optimizer = trainer.loom_module.optimizers()
            trainer._call_module("optimizer_step", trainer.current_epoch, batch_idx, optimizer, closure)
        else:
            trainer._adapter.optimizer_step(raw, closure=closure)
        if "output" not in result:
            raise ConfigurationError(
                f"{type(trainer.loom_module).__name__}.optimizer_step did not run the closure it was given, so "
                "training_step never ran. Call optimizer.step(closure=optimizer_closure) (or optimizer_closure()) "
                "in it."
            )
        configs = trainer.lr_scheduler_configs
        if configs:
            step_schedulers(
                configs,
                "step",
                trainer.global_step,
                trainer.callback_metrics,
                lambda scheduler, metric: trainer._call_module("lr_scheduler_step", scheduler, metric),
            )
        trainer._call("on_before_zero_grad", raw)
        if trainer._overrides("optimizer_zero_grad"):
            optimizer = trainer.loom_module.optimizers()
            trainer._call_module("optimizer_zero_grad", trainer.current_epoch, batch_idx, optimizer)
        else:
            trainer._adapter.zero_grad(raw)
        return detached(result["output"])

    def _forward_backward(self, batch: Any, batch_idx: int, result: dict[str, Any]) -> Tensor | None:
        trainer = self.trainer
        output = trainer._training_step(batch, batch_idx)
        result["output"] = output
        loss = loss_of(output)
        self.skip_step_hooks = loss is None
        if loss is None:
            return None
        loss = loss / trainer.accumulate_grad_batches if trainer.accumulate_grad_batches > 1 else loss
        trainer._call("on_before_backward", loss)
        trainer._adapter.backward(loss)
        trainer._call("on_after_backward")
        return loss

    def before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Runs between the closure and the step: the hooks, then gradient clipping."""
        if self.skip_step_hooks:
            return
        trainer = self.trainer
        trainer._call("on_before_optimizer_step", optimizer)
        config = trainer._config
        if not trainer._overrides("configure_gradient_clipping") and (
            config.gradient_clip_val is None or trainer.strategy.clips_gradients_in_step
        ):
            return  # the base's would clip nothing, or the strategy clips inside its step (configure_loop)
        trainer._call_module(
            "configure_gradient_clipping", optimizer, config.gradient_clip_val, config.gradient_clip_algorithm
        )


class ManualOptimization:
    """The module calls ``manual_backward`` and steps its optimizers itself inside ``training_step``."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def run(self, batch: Any, batch_idx: int, ends_window: bool) -> Any:
        return detached(self.trainer._training_step(batch, batch_idx))

    def before_optimizer_step(self, optimizer: Optimizer) -> None:
        self.trainer._call("on_before_optimizer_step", optimizer)
