"""PreemptionCheckpoint: on SIGTERM (or SLURM's warning signal) save at the next step and end fit cleanly.

On by default whenever checkpointing is (``enable_checkpointing``): a job that a scheduler stops keeps its
work. About once a second, at an optimizer step, the ranks agree whether any of them got the signal (core's
``PreemptionWatch``); if so every rank saves at once through ``trainer.save_checkpoint`` (the full
checkpoint ``fit(ckpt_path=...)`` resumes exactly, mid-epoch included) to ``last.ckpt`` in the
ModelCheckpoint's folder, where ``fit(ckpt_path="last")`` looks. A validation due at that step still runs
(then the file is written again, so a resume sees it: its metrics, checkpoints, random draws); then fit
returns with ``trainer.state.preempted`` set, before the epoch's end, and the process can exit 0. Under
SLURM, after the requeue signal, the job is requeued. Signal handlers are installed for the training loop only.

Turn it off with ``PreemptionCheckpoint(signals=[])``, or change it by passing one with other arguments.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from torchloom.core.errors import ConfigurationError
from torchloom.core.preemption import PreemptionWatch, SignalSpec, check_arguments
from torchloom.core.utils.rank_zero import rank_zero_info, rank_zero_warn
from torchloom.trainer.callbacks.callback import Callback

if TYPE_CHECKING:
    from torchloom.trainer.module import LoomModule
    from torchloom.trainer.trainer import Trainer

__all__ = ["FitPreempted", "PreemptionCheckpoint"]

LAST_NAME = "last.ckpt"


class FitPreempted(Exception):
    """Raised by ``PreemptionCheckpoint`` once saved, to leave the loops at once; the runner ends fit on it."""


class PreemptionCheckpoint(Callback):
    """Saves a resumable checkpoint and stops fit when the job is being preempted; see the module doc.

    ``dirpath``: where ``last.ckpt`` goes; ``None``: the first ModelCheckpoint's folder (needed then).
    ``signals``, ``check_every_n_steps``, ``requeue``: as core's ``PreemptionWatch`` (``signals=None``:
    SIGTERM, plus SIGUSR1 under SLURM; ``check_every_n_steps=None``: the ranks agree about once a second,
    one all-reduce each time, counting optimizer steps).
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        signals: SignalSpec | Sequence[SignalSpec] | None = None,
        check_every_n_steps: int | None = None,
        requeue: bool | None = None,
    ) -> None:
        if dirpath is not None and (not isinstance(dirpath, (str, os.PathLike)) or os.path.isfile(dirpath)):
            raise ConfigurationError(
                f"PreemptionCheckpoint(dirpath={dirpath!r}) is not valid. Valid: None (the ModelCheckpoint's folder) "
                "or the path of a folder."
            )
        check_arguments(
            "PreemptionCheckpoint", signals=signals, check_every_n_steps=check_every_n_steps, requeue=requeue
        )
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self._options: dict[str, Any] = {
            "signals": signals, "check_every_n_steps": check_every_n_steps, "requeue": requeue,
        }  # fmt: skip
        self._watch: PreemptionWatch | None = None
        self._last_step = -1
        self._stopping = False  # saved; fit ends at the next of: epoch end, batch start
        self._validated = False  # a validation ran between the save and the stop
        self.saved_path: str | None = None

    @override
    def on_train_start(self, trainer: Trainer, module: LoomModule) -> None:
        self.saved_path, self._stopping, self._validated = None, False, False
        self._last_step = trainer.global_step
        watch = PreemptionWatch(trainer.strategy, owner="PreemptionCheckpoint", **self._options)
        if not watch.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCheckpoint: fit runs outside the main thread, which cannot catch signals.")
            return
        self._folder(trainer)  # fails now, not when the signal comes
        watch.install()
        self._watch = watch

    @override
    def on_train_batch_end(
        self, trainer: Trainer, module: LoomModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._watch is None or self._stopping or trainer.global_step == self._last_step:
            return  # only where an optimizer step ended: gradients mid-accumulation are not in checkpoints
        self._last_step = trainer.global_step
        if not self._watch.requested():
            return
        self._save(trainer)  # at once: a validation due at this step may outlast the grace period
        self._stopping, self._validated = True, False
        trainer.should_stop = True  # the epoch ends after this step's validation, if one is due

    @override
    def on_validation_end(self, trainer: Trainer, module: LoomModule) -> None:
        self._validated = self._stopping

    @override
    def on_train_epoch_end(self, trainer: Trainer, module: LoomModule) -> None:
        if self._stopping:  # the stop ended the epoch (runs before the epoch's own end: a resume runs that)
            self._finish(trainer)

    @override
    def on_train_batch_start(self, trainer: Trainer, module: LoomModule, batch: Any, batch_idx: int) -> None:
        if self._stopping:  # min_epochs / min_steps kept the epoch going past should_stop
            self._finish(trainer)

    def _finish(self, trainer: Trainer) -> None:
        assert self._watch is not None
        if self._validated:  # validation ran after the save (metrics, random state): a resume must see it
            progress = trainer._progress
            finished, progress.epoch_finished = progress.epoch_finished, False
            try:
                self._save(trainer)
            finally:
                progress.epoch_finished = finished
        received = self._watch.signal
        what = received.name if received is not None else "a preemption signal (on another rank)"
        rank_zero_info(
            f"PreemptionCheckpoint: {what} received; saved {self.saved_path!r} at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, {trainer._progress.batches_done} batches done); fit stops. Resume "
            "with fit(ckpt_path='last')."
        )
        if self._watch.requeue():
            rank_zero_info("PreemptionCheckpoint: the SLURM job was requeued.")
        raise FitPreempted

    def _save(self, trainer: Trainer) -> None:
        path = os.path.join(self._folder(trainer), LAST_NAME)
        trainer.save_checkpoint(path)
        self.saved_path = path
        trainer.state.preempted = True

    def _folder(self, trainer: Trainer) -> str:
        if self.dirpath is not None:
            return self.dirpath
        checkpoint = trainer.checkpoint_callback
        folder = checkpoint.dirpath if checkpoint is not None else None
        if folder is None:
            raise ConfigurationError(
                "PreemptionCheckpoint(dirpath=None) saves into the ModelCheckpoint's folder, but there is no "
                "ModelCheckpoint. Valid: enable_checkpointing=True, a ModelCheckpoint in callbacks, or "
                "PreemptionCheckpoint(dirpath=...)."
            )
        return folder

    def _release(self) -> None:
        if self._watch is not None:
            self._watch.uninstall()
            self._watch = None

    @override
    def on_train_end(self, trainer: Trainer, module: LoomModule) -> None:
        self._release()

    @override
    def teardown(self, trainer: Trainer, module: LoomModule, stage: str) -> None:
        self._release()

    @override
    def on_exception(self, trainer: Trainer, module: LoomModule, exception: BaseException) -> None:
        self._release()
