"""The fit loop: epochs until ``max_epochs`` / ``max_steps`` / ``should_stop`` (once the minimums are met).

Each epoch: (dataloaders reloaded when due) -> the training epoch (``training_epoch.py``) ->
``on_train_epoch_end`` of the callbacks, then of the module -> the epoch's training metrics reduced
and sent to the loggers -> ``on_train_epoch_end`` of the checkpointing / early-stopping callbacks (so
they can monitor those metrics) -> epoch-interval schedulers -> the next epoch. Checkpoints saved at the end of an epoch record ``epoch_finished``; a resume from one
performs what followed the save (the scheduler step) before moving on, so it continues exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torchloom.core.utils.rank_zero import rank_zero_info
from torchloom.trainer.loops.training_epoch import TrainingEpochLoop
from torchloom.trainer.optimizers import step_schedulers

if TYPE_CHECKING:
    from torchloom.trainer.trainer import Trainer

__all__ = ["FitLoop"]


class FitLoop:
    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.epoch_loop = TrainingEpochLoop(trainer)

    @property
    def done(self) -> bool:
        trainer = self.trainer
        config = trainer._config
        if trainer.num_training_batches == 0:
            return True
        if trainer._reached_max_steps():
            return True
        if config.max_epochs != -1 and trainer._progress.epoch >= config.max_epochs:
            return True
        return trainer.should_stop and trainer._can_stop_early()

    def run(self) -> None:
        trainer = self.trainer
        progress = trainer._progress
        if trainer.num_training_batches == 0:
            rank_zero_info("The training dataloader has no batches (or limit_train_batches is 0): nothing to fit.")
        trainer._call("on_train_start")
        if progress.epoch_finished:  # resumed from a checkpoint saved at the end of an epoch
            self._finish_epoch(restored=True)
        while not self.done:
            trainer._reload_dataloaders_if_due()
            self.epoch_loop.run()
            progress.epoch_finished = True
            trainer._call_callbacks("on_train_epoch_end", monitoring=False)
            trainer._call_module("on_train_epoch_end")
            if trainer._metrics.enabled:
                metrics = trainer._metrics.epoch_end("train")
                if metrics:
                    trainer._log_metrics(metrics)
            trainer._call_callbacks("on_train_epoch_end", monitoring=True)  # they see this epoch's metrics
            self._finish_epoch(restored=False)
        trainer._call("on_train_end")

    def _finish_epoch(self, restored: bool) -> None:
        trainer = self.trainer
        progress = trainer._progress
        if trainer.loom_module.automatic_optimization:  # manual optimization steps its schedulers itself
            step_schedulers(
                trainer.lr_scheduler_configs,
                "epoch",
                progress.epoch + 1,
                progress.metrics if restored else trainer.callback_metrics,
                lambda scheduler, metric: trainer._call_module("lr_scheduler_step", scheduler, metric),
            )
        if trainer.world_size > 1:  # every rank stops together, or none does
            trainer.should_stop = trainer._adapter.reduce_boolean_decision(trainer.should_stop, all=False)
        progress.start_next_epoch()
