"""Distributed samplers whose epoch can begin part-way through one global order of samples.

``ResumableDistributedSampler`` splits an epoch's global order (the same on every rank, whatever their number)
over the ranks and can start at any position of it; ``DistributedSamplerWrapper`` does the same over a custom
sampler's draw. A checkpoint that records how many positions were consumed resumes on any number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any, cast

import torch
from torch.utils.data import DistributedSampler, RandomSampler, Sampler, SequentialSampler

from torchloom.core.errors import ConfigurationError, choices

__all__ = ["ORDERS", "DistributedSamplerWrapper", "ResumableDistributedSampler"]

ORDERS = ("seeded", "drawn")


class ResumableDistributedSampler(DistributedSampler[Any]):
    """A ``DistributedSampler`` whose epoch can begin part-way through the epoch's global order.

    An epoch's global order is one sequence of dataset indices, the same on every rank, whatever the
    number of ranks. It is ``"seeded"``: the indices, shuffled with ``seed + epoch`` when ``shuffle``
    (``DistributedSampler``'s order); or ``"drawn"``: what the sampler ``draw`` yields, drawn once per epoch
    when the iteration begins (one process's ``RandomSampler``: the order that the random state at the
    epoch's start gives; ranks must draw alike).

    Rank ``r`` of ``W`` takes the positions ``start + r``, ``start + r + W``, ... Past the order's end it
    continues from the order's beginning (padding, so every rank gets as many, as ``DistributedSampler``
    pads), unless ``drop_last`` cuts what is left to a multiple of ``W``. With ``start=0`` and the seeded
    order this is ``DistributedSampler`` exactly. After ``k`` full batches of ``B`` on every rank the ranks
    have consumed exactly the first ``k * B * W`` positions, so ``set_start(k * B * W)`` on any number of
    ranks gives the rest of the epoch. ``set_epoch`` puts ``start`` (and the order) back.
    """

    def __init__(self, dataset: Any, *args: Any, draw: Sampler[Any] | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.draw = draw
        self.start = 0
        self._draw_now = draw  # this epoch's (a resume may follow the other order, see set_start)

    @property
    def order(self) -> str:
        """This epoch's kind of global order: ``"seeded"`` or ``"drawn"``."""
        return "seeded" if self._draw_now is None else "drawn"

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0
        self._draw_now = self.draw

    def set_start(self, start: int, order: str | None = None) -> None:
        """Begins this epoch at position ``start`` of its global order (until the next ``set_epoch``).

        ``order``: the kind of order the epoch began with (another number of ranks draws a plain shuffle
        differently: one process from the random state, several from the seed).
        """
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ConfigurationError(f"set_start({start!r}) is not valid. Valid: an int >= 0 (a position in order).")
        if order is not None and order != self.order:
            self._draw_now = self._other_order(order)
        self.start = start

    def _other_order(self, order: str) -> Sampler[Any] | None:
        plain = self.draw is None or _draws_plainly(self.draw, self.dataset, self.shuffle)
        if order not in ORDERS or not plain:
            raise ConfigurationError(
                f"The epoch began with the {order!r} order of {type(self.draw or self).__name__}, which this sampler "
                f"cannot follow. Valid: {choices(ORDERS)}, for a dataset's indices in order or plainly shuffled."
            )
        if order == "seeded":
            return None
        dataset = cast(Sized, self.dataset)
        return RandomSampler(dataset) if self.shuffle else SequentialSampler(dataset)

    def global_order(self) -> list[int]:
        """The epoch's order of indices (drawn anew at each call when the order is ``"drawn"``)."""
        if self._draw_now is not None:
            return list(self._draw_now)
        size = len(cast(Sized, self.dataset))
        if not self.shuffle:
            return list(range(size))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(size, generator=generator).tolist()

    def _count(self, size: int) -> int:
        """How many positions this rank takes of an order of ``size``."""
        left = max(0, size - self.start)
        return left // self.num_replicas if self.drop_last else -(-left // self.num_replicas)

    def __iter__(self) -> Iterator[Any]:  # a generator: the order is drawn when the iteration begins, not before
        order = self.global_order()
        size, first = len(order), self.start + self.rank
        for j in range(self._count(size)):
            yield order[(first + j * self.num_replicas) % size]

    def __len__(self) -> int:
        return self._count(len(cast(Sized, self.dataset)))


def _draws_plainly(sampler: Sampler[Any], dataset: Any, shuffle: bool) -> bool:
    """Whether ``sampler`` yields ``dataset``'s indices once each, in order or (``shuffle``) shuffled."""
    if type(sampler) is SequentialSampler:
        return not shuffle and sampler.data_source is dataset
    return (
        shuffle
        and type(sampler) is RandomSampler
        and sampler.data_source is dataset
        and not sampler.replacement
        and sampler.num_samples == len(dataset)
    )


class _SamplerIndices:
    """The indices one pass of a sampler yields, as a sequence (drawn anew each epoch, when iterated)."""

    def __init__(self, sampler: Sampler[Any]) -> None:
        self._sampler = sampler
        self._indices: list[Any] | None = None

    def refresh(self) -> None:
        self._indices = list(self._sampler)

    def __getitem__(self, index: int) -> Any:
        assert self._indices is not None, "refresh() draws the indices first"
        return self._indices[index]

    def __len__(self) -> int:  # before the first draw, the sampler's own: drawing now would use random state
        return len(self._indices) if self._indices is not None else len(cast(Sized, self._sampler))


class DistributedSamplerWrapper(ResumableDistributedSampler):
    """Gives each rank its share of a custom sampler's indices (weighted, grouped, ...).

    Every epoch the wrapped sampler is drawn once on every rank, when the iteration begins; ranks must
    draw the same sequence (seed the sampler's generator alike). The epoch's global order is that draw
    (its positions shuffled with ``seed + epoch`` when ``shuffle``): with ``shuffle=False`` rank ``r``
    takes every ``num_replicas``-th index from position ``start + r``, so the sampler's order is kept.
    """

    def __init__(self, sampler: Sampler[Any], *args: Any, **kwargs: Any) -> None:
        if not isinstance(sampler, Sized):
            raise ConfigurationError(
                f"DistributedSamplerWrapper needs a sampler with a length, got {type(sampler).__name__}."
            )
        self._indices = _SamplerIndices(sampler)
        super().__init__(self._indices, *args, **kwargs)
        self.wrapped = sampler

    def _other_order(self, order: str) -> Sampler[Any] | None:
        raise ConfigurationError(
            f"The epoch began with the {order!r} order of another sampler; this one's order is the draw of its "
            f"{type(self.wrapped).__name__}. Valid: resume with the training dataloader of the run that saved."
        )

    def __iter__(self) -> Iterator[Any]:
        self._indices.refresh()
        return (self._indices[position] for position in super().__iter__())
