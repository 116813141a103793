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
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.utils.collections import apply_to_collection

__all__ = [
    "REDUCE_OPS",
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
