"""Where a training epoch begins: its first batch, or the point a mid-epoch checkpoint left it at.

A resumed epoch continues the interrupted epoch's global sample order. When the training loader's
sampler can begin part-way (``torchloom.core.data.resumable_sampler``) it is told the position
``samples_done`` the checkpoint recorded, and the ranks, however many there are now, share out the
rest of the order. Other loaders (iterable datasets, samplers of the user's own) are read and
dropped batch by batch up to ``batches_done``, which gives the same samples on the same number of
processes only: on another number, the resume is refused rather than repeating or skipping samples.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torchloom.core.data import resumable_sampler
from torchloom.core.errors import ConfigurationError
from torchloom.core.utils.rank_zero import rank_zero_warn
from torchloom.trainer.state import FitProgress

__all__ = ["EpochStart", "epoch_start"]


class EpochStart(NamedTuple):
    first: int  # batch_idx of the first batch trained
    skip: int  # batches read and dropped before it (a fast-forward)
    part_way: bool  # the loader itself begins part-way: it yields only what is left of the epoch
    per_batch: int | None  # positions of the global order one batch takes on each rank (None: no such order)


class _Saved(NamedTuple):
    batches_done: int
    samples_done: int | None
    world_size: int | None
    sample_order: str | None


def epoch_start(progress: FitProgress, loader: Any, world_size: int, accumulate: int) -> EpochStart:
    """Sets up ``loader`` (already told the epoch) to begin where ``progress`` says, and says where that is."""
    found = resumable_sampler(loader)
    per_batch = found[1] if found is not None else None
    saved = _Saved(progress.batches_done, progress.samples_done, progress.world_size, progress.sample_order)
    progress.world_size = world_size
    progress.sample_order = found[0].order if found is not None else None
    if saved.batches_done == 0:  # a fresh epoch
        progress.samples_done = 0 if found is not None else None
        return EpochStart(0, 0, False, per_batch)
    if found is not None and saved.samples_done is not None:
        sampler, per_batch = found
        sampler.set_start(saved.samples_done, saved.sample_order)  # the order the epoch began with
        progress.sample_order = sampler.order
        if saved.world_size == world_size:
            return EpochStart(saved.batches_done, 0, True, per_batch)
        # in this world size's batches; whole accumulation windows, so the first one is not cut short
        first = saved.samples_done // (per_batch * world_size)
        return EpochStart(first - first % accumulate, 0, True, per_batch)
    if saved.world_size is not None and saved.world_size != world_size:
        raise ConfigurationError(_refusal(progress, saved, world_size, loader))
    if saved.world_size is None:  # written before checkpoints recorded it: nothing to check against
        rank_zero_warn(
            f"The checkpoint was saved in the middle of epoch {progress.epoch} by a torchloom that did not record the "
            f"number of processes; its {saved.batches_done} batches per process are skipped assuming it was "
            f"{world_size}, as in this run (on another number, samples would be repeated or skipped)."
        )
    progress.samples_done = saved.batches_done * per_batch * world_size if per_batch is not None else None
    return EpochStart(saved.batches_done, saved.batches_done, False, per_batch)


def _refusal(progress: FitProgress, saved: _Saved, world_size: int, loader: Any) -> str:
    what = type(getattr(loader, "dataset", loader)).__name__
    return (
        f"The checkpoint was saved in the middle of epoch {progress.epoch} ({saved.batches_done} batches per process) "
        f"on {saved.world_size} process(es), and this run has {world_size}. Its training data ({what}) cannot begin "
        "part-way through the epoch's sample order on another number of processes, so samples would be repeated or "
        f"skipped. Valid: resume on {saved.world_size} process(es); or, in the run that saves and in this one, a "
        "map-style dataset in a DataLoader that the Trainer splits (use_distributed_sampler=True, no DistributedSampler "
        "of your own); or resume from a checkpoint saved at the end of an epoch."
    )
