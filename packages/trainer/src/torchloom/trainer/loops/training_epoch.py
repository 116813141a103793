"""One training epoch: its batches, step logging, and the validation checks that fall inside it.

For each batch: ``on_train_batch_start`` (returning -1 ends the epoch) -> the optimization of the
batch -> ``on_train_batch_end`` -> step metrics to the loggers (every ``log_every_n_steps``) ->
validation when a check is due. A resumed epoch first puts back the random state saved at the
interrupted epoch's start, then continues its sample order where the checkpoint left it (on any
number of processes when the loader's sampler can begin part-way, else by reading and dropping the
batches already trained; see ``resume_point.py``), and then puts back the random state of the
moment the checkpoint was saved.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from torchloom.core.data import set_sampler_epoch
from torchloom.trainer.data import infer_batch_size
from torchloom.trainer.loops.resume_point import epoch_start
from torchloom.trainer.rng import capture_rng, restore_rng

if TYPE_CHECKING:
    from torchloom.trainer.trainer import Trainer

__all__ = ["TrainingEpochLoop"]


class TrainingEpochLoop:
    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self._per_batch: int | None = None  # positions of the epoch's global order one batch takes on each rank

    def run(self) -> None:
        """Runs the batches of ``trainer.current_epoch`` from ``progress.batches_done`` on."""
        trainer = self.trainer
        progress = trainer._progress
        loader = trainer._train_loader()
        total = trainer.num_training_batches
        set_sampler_epoch(loader, progress.epoch)
        resume_rng, trainer._resume_rng = trainer._resume_rng, None
        if resume_rng is not None and progress.batches_done == 0:
            restore_rng(resume_rng)  # saved between epochs: the next one starts from the saved state
            resume_rng = None
        trainer._call("on_train_epoch_start")
        if progress.batches_done > 0 and progress.epoch_rng is not None:
            restore_rng(progress.epoch_rng)  # the interrupted epoch's batch order...
        else:
            progress.epoch_rng = capture_rng()
        start = epoch_start(progress, loader, trainer.world_size, trainer.accumulate_grad_batches)
        self._per_batch = start.per_batch
        if start.first >= total:
            iterator: Iterator[tuple[Any, bool]] = iter(())
        elif start.part_way:  # ...of which the loader yields only what is left (drawn at its first batch)
            iterator = _read_first(_batches(loader, min(total - start.first, len(loader))))
        else:
            iterator = _batches(loader, total)
            for _ in range(start.skip):
                next(iterator, None)  # ...without the batches trained before the save
        if resume_rng is not None:
            restore_rng(resume_rng)  # then dropout & co. continue from the moment of the save
        batch_idx = start.first
        for batch, is_last in iterator:
            if self._run_batch(batch, batch_idx, is_last):
                break
            batch_idx += 1

    def _run_batch(self, batch: Any, batch_idx: int, is_last: bool) -> bool:
        """One batch; returns whether the epoch ends here."""
        trainer = self.trainer
        progress = trainer._progress
        batch = trainer._transfer_batch(batch, 0)
        if trainer._metrics.enabled:
            trainer._metrics.current_batch_size = infer_batch_size(batch)
        if trainer._call("on_train_batch_start", batch, batch_idx) == -1:
            return True
        accumulate = trainer.accumulate_grad_batches
        ends_window = (batch_idx + 1) % accumulate == 0 or is_last
        outputs = trainer._optimization.run(batch, batch_idx, ends_window)
        progress.batches_done = batch_idx + 1
        if progress.samples_done is not None and self._per_batch is not None:
            progress.samples_done += self._per_batch * trainer.world_size
        progress.total_batches += 1
        trainer._call("on_train_batch_end", outputs, batch, batch_idx)
        stop = trainer._reached_max_steps() or (trainer.should_stop and trainer._can_stop_early())
        if trainer._metrics.enabled:
            due = progress.total_batches % trainer._config.log_every_n_steps == 0
            metrics = trainer._metrics.step_end(for_loggers=due or stop)
            if metrics:
                trainer._log_metrics(metrics)
        if self._validation_due(batch_idx, is_last):
            trainer._run_validation()
            stop = stop or (trainer.should_stop and trainer._can_stop_early())
        return stop

    def _validation_due(self, batch_idx: int, is_last: bool) -> bool:
        trainer = self.trainer
        config = trainer._config
        if not trainer._validation_enabled():
            return False
        if config.check_val_every_n_epoch is None:  # an int interval counted over all epochs
            return trainer._progress.total_batches % int(config.val_check_interval) == 0
        if (trainer.current_epoch + 1) % config.check_val_every_n_epoch != 0:
            return False
        every = trainer._val_check_batch
        if math.isinf(every):
            return is_last
        return (batch_idx + 1) % int(every) == 0


def _batches(loader: Iterable[Any], total: int | float) -> Iterator[tuple[Any, bool]]:
    """``(batch, is_last)`` pairs, at most ``total``; one batch is read ahead when the length is unknown.

    The loader's iterator is made here, at the call (it draws the epoch's shuffle from the random state).
    """
    iterator = iter(loader)
    if math.isinf(total):
        return _read_ahead(iterator)
    return _counted(iterator, int(total))


def _read_first(iterator: Iterator[Any]) -> Iterator[Any]:
    """``iterator`` with its first item read now, while the random state is still the epoch start's."""
    sentinel = object()
    first = next(iterator, sentinel)
    return iter(()) if first is sentinel else itertools.chain([first], iterator)


def _counted(iterator: Iterator[Any], total: int) -> Iterator[tuple[Any, bool]]:
    for index in range(total):
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield batch, index + 1 == total


def _read_ahead(iterator: Iterator[Any]) -> Iterator[tuple[Any, bool]]:
    sentinel = object()
    current: Any = next(iterator, sentinel)
    while current is not sentinel:
        following = next(iterator, sentinel)
        yield current, following is sentinel
        current = following
