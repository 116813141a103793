"""The prediction loop: ``predict_step`` over every predict dataloader, in eval mode without autograd.

on_predict_start -> on_predict_epoch_start
  for each dataloader, for each batch: on_predict_batch_start -> predict_step -> on_predict_batch_end
on_predict_epoch_end -> on_predict_end
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from torchloom.trainer.loops.evaluation import EvalLoopBase, eval_mode

if TYPE_CHECKING:
    from torchloom.trainer.trainer import Trainer

__all__ = ["PredictionLoop"]


class PredictionLoop(EvalLoopBase):
    """``predict``: the outputs of ``predict_step``, one list per dataloader."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer, "predict")

    def run(self, loaders: list[Iterable[Any]], counts: list[int | float]) -> list[list[Any]]:
        trainer = self.trainer
        several = len(loaders) > 1
        outputs: list[list[Any]] = [[] for _ in loaders]
        with eval_mode(trainer):
            trainer._call("on_predict_start")
            trainer._call("on_predict_epoch_start")
            for batch, batch_idx, dataloader_idx in self._batches(loaders, counts):
                outputs[dataloader_idx].append(self._step(batch, batch_idx, dataloader_idx, several, "predict"))
            trainer._call("on_predict_epoch_end")
            trainer._call("on_predict_end")
        return outputs
