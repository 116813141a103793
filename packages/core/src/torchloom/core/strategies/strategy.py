"""The Strategy contract: how a job is spread over processes and devices.

A strategy never holds the user's model, optimizers or trainer. Products tell it what to act on
(``setup_module(module)``, ``backward(loss, module)``, ``optimizer_step(optimizer)``) and keep what it
returns. That is what lets one strategy class serve Fabric and the Trainer unchanged.
"""

from __future__ import annotations

import contextlib
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torchloom.core.accelerators.accelerator import Accelerator
from torchloom.core.checkpoint.io import CheckpointIO, TorchCheckpointIO
from torchloom.core.errors import ConfigurationError
from torchloom.core.launchers.launcher import Launcher
from torchloom.core.precision.precision import Precision
from torchloom.core.utils.collections import apply_to_collection
from torchloom.core.utils.init import SkipInit

__all__ = ["ReduceOp", "Strategy", "parameters_with_grads", "unwrap_module"]

T = TypeVar("T")
ReduceOp = str  # "mean", "sum", "max", "min", "product"
StateFilter = dict[str, Callable[[str, Any], bool]]


class Strategy(ABC):
    """Base of every strategy. Subclasses override what their distribution scheme changes."""

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        precision: Precision | None = None,
        checkpoint_io: CheckpointIO | None = None,
    ) -> None:
        self._accelerator = accelerator
        self._precision = precision
        self._checkpoint_io = checkpoint_io
        self._launcher: Launcher | None = None

    # ------------------------------------------------------------------ wiring (set by the connector)
    @property
    def accelerator(self) -> Accelerator:
        if self._accelerator is None:
            raise ConfigurationError(f"{type(self).__name__} has no accelerator yet; the connector sets it.")
        return self._accelerator

    @accelerator.setter
    def accelerator(self, accelerator: Accelerator) -> None:
        self._accelerator = accelerator

    @property
    def precision(self) -> Precision:
        if self._precision is None:
            self._precision = Precision()
        return self._precision

    @precision.setter
    def precision(self, precision: Precision) -> None:
        self._precision = precision

    @property
    def checkpoint_io(self) -> CheckpointIO:
        if self._checkpoint_io is None:
            self._checkpoint_io = self.default_checkpoint_io()
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        self._checkpoint_io = io

    def default_checkpoint_io(self) -> CheckpointIO:
        """What the strategy saves with when it was given no ``checkpoint_io`` (an XLA strategy: ``xm.save``)."""
        return TorchCheckpointIO()

    @property
    def launcher(self) -> Launcher | None:
        """Starts the worker processes, or ``None`` when this process is the only worker."""
        return self._launcher

    def configure_launcher(self) -> None:
        """Builds ``self._launcher`` once the strategy is fully wired. Single-process: none."""

    def adapt_precision(self, precision: Precision) -> Precision:
        """The precision to run with, given the one the user chose (the connector calls it).

        A strategy that needs its own variant of a precision returns it here, and one that cannot run
        a precision raises ``ConfigurationError`` listing those it can. The default keeps ``precision``.
        """
        return precision

    # ------------------------------------------------------------------ topology
    @property
    @abstractmethod
    def root_device(self) -> torch.device:
        """The device this process computes on."""

    @property
    def global_rank(self) -> int:
        return 0

    @property
    def local_rank(self) -> int:
        return 0

    @property
    def node_rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any] | None:
        """Arguments for a ``DistributedSampler``, or ``None`` when data need not be split."""
        return None

    # Capabilities products may read instead of checking concrete classes.
    requires_joint_setup: bool = False  # module and optimizers must be set up together (DeepSpeed)
    restore_checkpoint_after_setup: bool = False  # sharded state loads into the already wrapped module
    uses_xla: bool = False  # runs on XLA devices (the connector pairs XLA devices only with such strategies)
    # setup_module gives modules built under module_init_context(empty_init=True) their memory and values
    # (sharded strategies: each rank only its shard), so products build late layers (configure_model) empty
    initializes_empty_modules: bool = False
    # evaluation may run under torch.inference_mode(); FSDP2 reuses buffers made there when training resumes
    supports_inference_mode: bool = True
    # the strategy clips gradients inside optimizer_step (DeepSpeed, by its config); products then do not clip
    clips_gradients_in_step: bool = False

    def configure_loop(
        self,
        *,
        micro_batch_size: int | None = None,
        accumulation_steps: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
    ) -> None:
        """Told by a product, before setup, how its loop batches, accumulates and clips.

        A strategy whose engine is built from these (DeepSpeed) records them; the others ignore them.
        """

    def setup_outlives_run(self, module: nn.Module) -> bool:
        """Whether what ``setup_module`` made of a module must be kept for later runs instead of torn down.

        True for modules sharded into DTensors (sharding cannot be undone or applied twice, and the shards
        belong to the process group a teardown destroys); strategies with engines built once say so too.
        """
        dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)  # none before it is imported
        return dtensor is not None and any(isinstance(p, dtensor) for p in module.parameters())

    # ------------------------------------------------------------------ lifecycle
    def setup_environment(self) -> None:
        """Prepares this process: device, process group. Called in every worker after launch."""
        self.accelerator.setup_device(self.root_device)

    def teardown(self) -> None:
        self.precision.teardown()
        self.checkpoint_io.teardown()
        if self._accelerator is not None:
            self._accelerator.teardown()

    # ------------------------------------------------------------------ modules, optimizers, data
    def setup_module_and_optimizers(
        self, module: nn.Module, optimizers: list[Optimizer], scheduler: Any = None
    ) -> tuple[nn.Module, list[Optimizer], Any]:
        """Sets up a module together with its optimizers (and scheduler)."""
        module = self.setup_module(module)
        return module, [self.setup_optimizer(o) for o in optimizers], scheduler

    def setup_module(self, module: nn.Module) -> nn.Module:
        """Wraps ``module`` for the strategy (DDP, FSDP, ...). Returns the object to call."""
        return module

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        return optimizer

    def module_to_device(self, module: nn.Module) -> None:
        module.to(self.root_device)

    @contextlib.contextmanager
    def tensor_init_context(self) -> Generator[None, None, None]:
        """New tensors land on the root device with the precision's dtype."""
        with self.root_device, self.precision.tensor_init_context():
            yield

    @contextlib.contextmanager
    def module_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """Active while the user builds the model. ``empty_init=True`` skips weight initialisation."""
        with SkipInit(enabled=bool(empty_init)), self.root_device, self.precision.module_init_context():
            yield

    def batch_to_device(self, batch: Any, device: torch.device | None = None) -> Any:
        target = device or self.root_device
        non_blocking = target.type == "cuda"
        return apply_to_collection(batch, Tensor, lambda t: t.to(target, non_blocking=non_blocking))

    def process_dataloader(self, dataloader: Iterable[Any]) -> Iterable[Any]:
        return dataloader

    # ------------------------------------------------------------------ the step
    def backward(self, tensor: Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        tensor = self.precision.pre_backward(tensor, module)
        self.precision.backward(tensor, module, *args, **kwargs)
        self.precision.post_backward(tensor, module)

    def optimizer_step(self, optimizer: Optimizer, **kwargs: Any) -> Any:
        return self.precision.optimizer_step(optimizer, **kwargs)

    def zero_grad(self, optimizer: Optimizer, set_to_none: bool = True) -> None:
        """Clears the gradients of ``optimizer``'s parameters (an engine that owns the gradients clears its own)."""
        optimizer.zero_grad(set_to_none=set_to_none)

    def clip_gradients_norm(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = True,
    ) -> Tensor:
        """Clips the gradients of ``optimizer``'s parameters to a total norm; returns the norm before clipping.

        ``error_if_nonfinite`` does not apply under a precision that skips non-finite steps itself
        (``16-mixed``'s grad scaler): there an inf norm is the scaler's signal, not an error.
        """
        self.precision.unscale_gradients(optimizer)
        raise_on_nonfinite = error_if_nonfinite and not self.precision.skips_nonfinite_steps
        return torch.nn.utils.clip_grad_norm_(
            parameters_with_grads(optimizer), max_norm, norm_type=norm_type, error_if_nonfinite=raise_on_nonfinite
        )

    def clip_gradients_value(self, module: nn.Module, optimizer: Optimizer, clip_val: float) -> None:
        self.precision.unscale_gradients(optimizer)
        torch.nn.utils.clip_grad_value_(parameters_with_grads(optimizer), clip_val)

    @contextlib.contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Generator[None, None, None]:
        """Skips the gradient sync of backward calls inside it (for gradient accumulation)."""
        yield

    # ------------------------------------------------------------------ collectives (single process)
    def all_reduce(self, tensor: Any, group: Any | None = None, reduce_op: ReduceOp = "mean") -> Any:
        return tensor

    def all_gather(self, tensor: Any, group: Any | None = None, sync_grads: bool = False) -> Any:
        """Stacks each tensor of every rank along a new first dimension of size ``world_size``."""
        return apply_to_collection(tensor, Tensor, lambda t: t.unsqueeze(0))

    def broadcast(self, obj: T, src: int = 0) -> T:
        return obj

    def barrier(self, name: str | None = None) -> None:
        pass

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """Agrees on one decision across ranks: every rank's (``all=True``) or any rank's."""
        return decision

    # ------------------------------------------------------------------ checkpoints
    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        return unwrap_module(module).state_dict()

    def load_module_state_dict(self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
        unwrap_module(module).load_state_dict(state_dict, strict=strict)

    def get_optimizer_state(self, optimizer: Optimizer, module: nn.Module | None = None) -> dict[str, Any]:
        """``optimizer``'s state. ``module`` owns its parameters; sharded strategies need it (state keyed by name)."""
        return optimizer.state_dict()

    def load_optimizer_state(
        self, optimizer: Optimizer, state_dict: dict[str, Any], module: nn.Module | None = None
    ) -> None:
        optimizer.load_state_dict(state_dict)

    def convert_state(self, state: dict[str, Any], filter: StateFilter | None = None) -> dict[str, Any]:
        """Turns live objects in ``state`` (modules, optimizers or lists of them, anything with ``state_dict``) into
        plain data."""
        from torchloom.core.checkpoint.distributed import as_optimizers

        converted: dict[str, Any] = {}
        for key, obj in state.items():
            optimizers = as_optimizers(obj)  # one optimizer, or a list of them
            if isinstance(obj, nn.Module):
                value: Any = self.get_module_state_dict(obj)
            elif optimizers is not None:
                states = [self.get_optimizer_state(o) for o in optimizers]
                value = states[0] if isinstance(obj, Optimizer) else states
            elif callable(getattr(obj, "state_dict", None)) and not isinstance(obj, dict):
                value = obj.state_dict()
            else:
                value = obj
            if filter is not None and key in filter and isinstance(value, dict):
                value = {k: v for k, v in value.items() if filter[key](k, v)}
            converted[key] = value
        return converted

    def save_checkpoint(
        self, path: str | os.PathLike[str], state: dict[str, Any], filter: StateFilter | None = None
    ) -> None:
        """Saves ``state`` to ``path``; only global rank 0 writes, every rank waits until it is on disk."""
        checkpoint = self.convert_state(state, filter)
        if self.is_global_zero:
            self.checkpoint_io.save_checkpoint(checkpoint, path)
        self.barrier("save_checkpoint")

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        state: dict[str, Any] | None = None,
        strict: bool = True,
        weights_only: bool = True,
    ) -> dict[str, Any]:
        """Loads ``path`` into the objects of ``state`` in place; returns what was not restored.

        Plain values in ``state`` are replaced by the checkpoint's. With ``strict=True`` a key of
        ``state`` missing from the checkpoint, or a module with missing/unexpected keys, raises.
        A sharded checkpoint directory (written by FSDP, model parallel, DeepSpeed) loads too, as full tensors.
        A checkpoint that cannot be loaded (truncated, corrupt, not a dict, a pickle that would run code, an
        incomplete directory, written by a newer torchloom) raises ``CheckpointError``; nothing in it runs.
        """
        from torchloom.core.checkpoint.checks import check_checkpoint, check_entries
        from torchloom.core.checkpoint.distributed import as_optimizers

        checkpoint = self.read_checkpoint(path, state or {}, strict=strict, weights_only=weights_only)
        checkpoint = check_checkpoint(checkpoint, path)  # also what a custom CheckpointIO or strategy returns
        if state is None:
            return checkpoint
        check_entries(path, state, checkpoint, strict)
        for key, obj in state.items():
            if key not in checkpoint:
                continue
            value = checkpoint.pop(key)
            optimizers = as_optimizers(obj)
            if isinstance(obj, nn.Module):
                self.load_module_state_dict(obj, value, strict=strict)
            elif optimizers is not None:
                values = [value] if isinstance(obj, Optimizer) else list(value)
                for optimizer, optimizer_state in zip(optimizers, values, strict=True):
                    self.load_optimizer_state(optimizer, optimizer_state)
            elif callable(getattr(obj, "load_state_dict", None)) and not isinstance(obj, dict):
                obj.load_state_dict(value)
            else:
                state[key] = value
        return checkpoint

    def read_checkpoint(
        self, path: str | os.PathLike[str], state: dict[str, Any], strict: bool = True, weights_only: bool = True
    ) -> Any:
        """The checkpoint at ``path`` as plain data, for ``load_checkpoint`` to load into ``state``'s objects.

        Sharded directories are read whole, by this process alone. A strategy whose modules hold sharded
        tensors overrides it to read each shard straight into ``state``'s objects.
        """
        from torchloom.core.checkpoint.checks import refuse_directory
        from torchloom.core.checkpoint.deepspeed import is_deepspeed_checkpoint, load_consolidated
        from torchloom.core.checkpoint.distributed import is_sharded_checkpoint, load_sharded

        if is_sharded_checkpoint(path):  # a sharded strategy's directory (FSDP, model parallel, XLA SPMD)
            return load_sharded(path, distributed=False)
        if is_deepspeed_checkpoint(path):  # DeepSpeed's partitions, gathered to full float32 weights
            return load_consolidated(path)
        if os.path.isdir(path):
            refuse_directory(path)
        return self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        if self.is_global_zero:
            self.checkpoint_io.remove_checkpoint(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(accelerator={self._accelerator!r}, precision={self._precision!r})"


def unwrap_module(module: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / ``torch.compile`` wrappers (or the module itself)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        inner: object = None
        if isinstance(module, wrappers):
            inner = module.module
        elif type(module).__name__ == "OptimizedModule":  # torch.compile's wrapper; by name to keep dynamo unimported
            inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def parameters_with_grads(optimizer: Optimizer) -> list[Tensor]:
    """The parameters of ``optimizer`` that have a gradient (what clipping acts on)."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
