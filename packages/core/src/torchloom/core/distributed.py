"""Process-group setup and collectives on tensors, python numbers and nested collections.

Every helper works without a process group too (one process): reductions and broadcasts return
their input, a gather adds a leading dimension of size 1. Strategies call these; products call the
strategy.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
import warnings
from collections.abc import Iterator, Sized
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DistributedSampler, RandomSampler, Sampler, SequentialSampler

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.utils.collections import apply_to_collection

__all__ = [
    "REDUCE_OPS",
    "ORDERS",
    "DistributedSamplerWrapper",
    "ResumableDistributedSampler",
    "all_gather",
    "all_reduce",
    "barrier",
    "broadcast_object",
    "destroy_process_group",
    "init_process_group",
    "is_distributed",
    "parse_reduce_op",
    "reduce_boolean_decision",
]

T = TypeVar("T")
ReduceOpLike = str | dist.ReduceOp | dist.ReduceOp.RedOpType

# name -> torch op; "mean" is a sum divided by the world size (gloo has no AVG)
REDUCE_OPS: dict[str, dist.ReduceOp.RedOpType] = {
    "mean": dist.ReduceOp.SUM,
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}
_ALIASES = {"avg": "mean", "prod": "product"}
_generation = 0  # default process groups this process has created (the store key prefix of the next)
_retired_groups: list[Any] = []  # handles of destroyed default groups, see destroy_process_group


_created_groups: list[Any] = []  # default groups this module created (a user's own are theirs to end)


@atexit.register
def _release_groups_at_exit() -> None:
    """At exit, while the interpreter is whole: destroy a default group this module made and nobody destroyed,
    free unreachable wrappers (DDP sits in reference cycles, and its reducer holds a group), then drop the kept
    handles. A group left to interpreter finalization can have a gloo worker still freeing the tensors of the
    last collective; it needs the GIL, finalization ends such threads, and the process aborts."""
    if is_distributed() and any(group is dist.group.WORLD for group in _created_groups):
        destroy_process_group()
    _created_groups.clear()
    if _retired_groups:
        gc.collect()
        _retired_groups.clear()


def is_distributed() -> bool:
    """Whether a default process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def init_process_group(
    backend: str,
    *,
    rank: int,
    world_size: int,
    timeout: datetime.timedelta,
    main_address: str | None = None,
    main_port: int | None = None,
) -> bool:
    """Creates the default process group unless one exists; returns whether this call created it.

    ``timeout`` is mandatory: without it a stalled rank hangs its peers for torch's 30-minute default.
    The rendezvous store is at ``main_address:main_port`` when both are given (listening on loopback only
    when that address is a loopback one, see ``rendezvous``), else ``env://`` (``MASTER_ADDR`` / ``MASTER_PORT``).

    Each group this process creates gets its own key prefix in the rendezvous store: the store can
    outlive a group (torch elastic's agent hosts it; torch reuses a multi-tenant store on the same
    port), and a second group under the first one's keys would find stale peer addresses and fail.
    All ranks create their groups in the same order, so they agree on the prefix.
    """
    global _generation
    _retired_groups.clear()  # the groups destroyed before have long been idle
    if not dist.is_available():
        raise RuntimeError("This build of torch has no torch.distributed; multi-process strategies cannot run.")
    if dist.is_initialized():
        return False
    if backend.lower() == "mpi":  # MPI's runtime does the rendezvous and assigns the ranks
        dist.init_process_group(backend, timeout=timeout)
        _created_groups[:] = [dist.group.WORLD]
        return True
    from torch.distributed.distributed_c10d import PrefixStore  # only in builds with torch.distributed
    from torch.distributed.rendezvous import rendezvous

    from torchloom.core.rendezvous import tcp_store

    if main_address is not None and main_port is not None:  # loopback-only when the address is loopback
        store = tcp_store(main_address, main_port, rank, world_size, timeout)
    else:
        store, rank, world_size = next(rendezvous("env://", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    # an elastic restart meets in the same agent store as the failed attempt: its keys must not be read
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = PrefixStore(f"torchloom/attempt_{attempt}/{_generation}/default_pg", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world_size, timeout=timeout)
    _created_groups[:] = [dist.group.WORLD]
    _generation += 1
    return True


def destroy_process_group() -> None:
    """Destroys every process group, keeping the default group's handle until the next init or exit.

    A DDP wrapper that outlives the group (a user's variable, a test's local) holds it through its C++
    reducer. Were the reducer's release the group's last reference, the group's destructor would join
    gloo's worker threads inside a Python dealloc that holds the GIL, while a worker still freeing the
    tensors of a just-finished collective waits for that GIL: a deadlock (about one teardown in fifty
    here, right after a collective). With the handle kept, the last reference goes from Python, which
    releases the GIL around the destructor, and by then the workers are idle.
    """
    if is_distributed():
        _retired_groups.append(dist.group.WORLD)
        dist.destroy_process_group()


def parse_reduce_op(reduce_op: ReduceOpLike) -> tuple[Any, bool]:
    """Turns a reduce-op name (or a torch ``ReduceOp``) into ``(torch op, divide_by_world_size)``.

    Raises ``ConfigurationError`` listing the valid names for anything else.
    """
    if isinstance(reduce_op, (dist.ReduceOp, dist.ReduceOp.RedOpType)):
        return reduce_op, False
    name = reduce_op.lower() if isinstance(reduce_op, str) else reduce_op
    name = _ALIASES.get(name, name)
    if name not in REDUCE_OPS:
        raise ConfigurationError(f"reduce_op={reduce_op!r} is not supported. Valid: {choices(REDUCE_OPS)}.")
    return REDUCE_OPS[name], name == "mean"


def _world_size(group: Any | None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def all_reduce(data: Any, reduce_op: ReduceOpLike = "mean", group: Any | None = None) -> Any:
    """Reduces every tensor and python number in ``data`` across ranks; inputs are not modified.

    ``"mean"`` of an integer tensor is a float tensor; python numbers come back as python numbers.
    """
    op, divide = parse_reduce_op(reduce_op)
    if not is_distributed():
        return data
    world_size = _world_size(group)

    def reduce_tensor(tensor: Tensor) -> Tensor:
        result = tensor.detach().clone()
        if result.dtype == torch.bool:  # gloo cannot reduce bools: sum/max/min/product on ints agree
            result = result.to(torch.int64)
        dist.all_reduce(result, op=op, group=group)
        if divide:
            result = result / world_size if result.is_floating_point() else result.double() / world_size
        elif tensor.dtype == torch.bool:
            result = result.bool()
        return result

    def reduce_number(number: int | float) -> int | float:
        value = reduce_tensor(torch.tensor(number, dtype=torch.float64 if isinstance(number, float) else torch.int64))
        return value.item()

    data = apply_to_collection(data, Tensor, reduce_tensor)
    return apply_to_collection(data, (int, float), lambda x: x if isinstance(x, bool) else reduce_number(x))


def all_gather(data: Any, group: Any | None = None, sync_grads: bool = False) -> Any:
    """Gathers every tensor of ``data`` from all ranks, stacked along a new first dimension.

    All ranks must pass tensors of the same shape. With ``sync_grads=True`` the result is part of
    the autograd graph, so gradients flow back to each rank's input.
    """

    def gather(tensor: Tensor) -> Tensor:
        if not is_distributed():
            return tensor.unsqueeze(0)
        tensor = tensor.contiguous()
        if sync_grads:
            from torch.distributed.nn.functional import all_gather as differentiable_all_gather

            with warnings.catch_warnings():  # it points to a private replacement that returns a lazy subclass
                warnings.simplefilter("ignore", FutureWarning)
                parts = differentiable_all_gather(tensor, group=group or dist.group.WORLD)  # type: ignore[no-untyped-call]
            return torch.stack(parts)
        gathered = [torch.empty_like(tensor) for _ in range(_world_size(group))]
        dist.all_gather(gathered, tensor, group=group)
        return torch.stack(gathered)

    return apply_to_collection(data, Tensor, gather)


def broadcast_object(obj: T, src: int = 0, group: Any | None = None, device: torch.device | None = None) -> T:
    """Sends any picklable ``obj`` from rank ``src`` to every rank and returns it there."""
    if not is_distributed():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src, group=group, device=device)
    return box[0]  # type: ignore[no-any-return]


def barrier(group: Any | None = None, device_ids: list[int] | None = None) -> None:
    if is_distributed():
        dist.barrier(group=group, device_ids=device_ids)


def reduce_boolean_decision(
    decision: bool, all: bool = True, group: Any | None = None, device: torch.device | None = None
) -> bool:
    """``True`` when every rank (``all=True``) or at least one rank decided ``True``."""
    if not is_distributed():
        return decision
    votes = torch.tensor(int(decision), device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.SUM, group=group)
    count = int(votes.item())
    return count == _world_size(group) if all else count > 0


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
