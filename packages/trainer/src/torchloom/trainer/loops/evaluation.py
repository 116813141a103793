"""Validation and test loops (the sanity check is a short validation); the base of the prediction loop.

All run the module in eval mode under ``torch.inference_mode()`` (``torch.no_grad()`` with
``inference_mode=False`` or a strategy without ``supports_inference_mode``) and put every submodule's train/eval mode back afterwards. Order for
validation (test and predict alike, with their names)::

    on_validation_start -> on_validation_epoch_start
      for each dataloader, for each batch:
        on_validation_batch_start -> validation_step -> on_validation_batch_end
    on_validation_epoch_end -> (epoch metrics reduced) -> on_validation_end

``validation_step`` gets ``dataloader_idx`` only when there are several dataloaders; the batch hooks
always get it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchloom.trainer.data import infer_batch_size

if TYPE_CHECKING:
    from torchloom.trainer.trainer import Trainer

__all__ = ["EvalLoopBase", "EvaluationLoop", "eval_mode"]

_PREFIX = {"validate": "validation", "test": "test", "predict": "predict"}


@contextlib.contextmanager
def eval_mode(trainer: Trainer) -> Generator[None, None, None]:
    """The module in eval mode without autograd; every submodule's own mode is restored after."""
    module: nn.Module = trainer.loom_module
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    # a strategy that cannot evaluate under inference mode (FSDP reuses its buffers in training) gets no_grad
    inference = trainer._config.inference_mode and trainer.strategy.supports_inference_mode
    grad_off = torch.inference_mode() if inference else torch.no_grad()
    try:
        with grad_off:
            yield
    finally:
        for submodule, training in modes:
            submodule.training = training


def _limited(loader: Iterable[Any], count: int | float) -> Iterator[Any]:
    for index, batch in enumerate(loader):
        if index >= count:
            return
        yield batch


class EvalLoopBase:
    def __init__(self, trainer: Trainer, kind: str) -> None:
        self.trainer = trainer
        self.kind = kind  # "validate", "test" or "predict"
        self.prefix = _PREFIX[kind]

    def _batches(self, loaders: list[Iterable[Any]], counts: list[int | float]) -> Iterator[tuple[Any, int, int]]:
        for dataloader_idx, (loader, count) in enumerate(zip(loaders, counts)):
            if count == 0:
                continue
            for batch_idx, batch in enumerate(_limited(loader, count)):
                yield batch, batch_idx, dataloader_idx

    def _step(self, batch: Any, batch_idx: int, dataloader_idx: int, several: bool, stage: str) -> Any:
        trainer = self.trainer
        tag = dataloader_idx if several else None
        batch = trainer._transfer_batch(batch, dataloader_idx)
        if trainer._metrics.enabled:
            trainer._metrics.current_batch_size = infer_batch_size(batch)
        trainer._call(f"on_{self.prefix}_batch_start", batch, batch_idx, dataloader_idx, dataloader_idx=tag)
        step = f"{self.prefix}_step"
        extra = (dataloader_idx,) if several else ()
        with trainer._metrics.hook(step, stage, tag):
            output = trainer._adapter.call_step(step, batch, batch_idx, *extra)
        trainer._call(f"on_{self.prefix}_batch_end", output, batch, batch_idx, dataloader_idx, dataloader_idx=tag)
        return output


class EvaluationLoop(EvalLoopBase):
    """``validate`` (also the sanity check) or ``test``: runs the steps and reduces what they logged."""

    def run(self, loaders: list[Iterable[Any]], counts: list[int | float], sanity: bool = False) -> dict[str, float]:
        """Returns the epoch values logged to the loggers (nothing for the sanity check)."""
        trainer = self.trainer
        stage = "sanity_check" if sanity else self.kind
        if sanity:
            limit = trainer._config.num_sanity_val_steps
            counts = [count if limit == -1 else min(count, limit) for count in counts]
        several = len(loaders) > 1
        logged: dict[str, float] = {}
        with eval_mode(trainer):
            trainer._call(f"on_{self.prefix}_start")
            trainer._call(f"on_{self.prefix}_epoch_start")
            for batch, batch_idx, dataloader_idx in self._batches(loaders, counts):
                self._step(batch, batch_idx, dataloader_idx, several, stage)
            trainer._call(f"on_{self.prefix}_epoch_end")
            if trainer._metrics.enabled and not sanity:
                logged = trainer._metrics.epoch_end(stage)
            trainer._call(f"on_{self.prefix}_end")
        return logged
