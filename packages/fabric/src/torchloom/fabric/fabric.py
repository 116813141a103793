"""Fabric: the user keeps their own training loop; Fabric puts it on the chosen hardware and strategy.

A plain PyTorch loop changes in a few lines: build a ``Fabric``, ``launch`` it, ``setup`` the model and
optimizer (and dataloaders), call ``fabric.backward(loss)`` instead of ``loss.backward()``. Everything
else is delegated to a core strategy, unchanged: Fabric never asks which strategy class it holds, only
what the strategy can do (``launcher``, ``requires_joint_setup``, ``distributed_sampler_kwargs``).

Rules Fabric enforces (each with an error that says what to do, see ``checks.py``):

- With a strategy that runs several processes, ``setup*``, ``backward``, collectives, ``save``/``load``
  and ``init_module`` need the processes first: call ``fabric.launch()`` (or start the script with
  ``torchloom run``, under which Fabric sets the process up when it is built).
- A module is set up once; ``setup`` refuses a ``FabricModule`` or a module this Fabric set up already.
- Optimizers over set-up parameters step through the ``FabricOptimizer`` that ``setup`` returned.
- Where setup replaces the parameters (FSDP, model parallel shard them into new tensors), an optimizer
  built before ``setup_module`` is refused by ``setup_optimizers``: build it afterwards, or pass it to
  ``setup(model, optimizer)``, which points it at the new parameters.
- Where the strategy or precision customises backward (``16-mixed`` scales the loss; ``bf16-mixed``
  shares its class), ``loss.backward()`` on a ``FabricModule``'s output raises: use ``fabric.backward``.
- A ``FabricDataLoader`` is iterated in the process that set it up.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import sys
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, overload

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from torchloom.core.accelerators.accelerator import Accelerator, DeviceSpec
from torchloom.core.checkpoint.checks import VERSION_KEY, running_version
from torchloom.core.connector import PluginArg
from torchloom.core.distributed import parse_reduce_op
from torchloom.core.errors import ConfigurationError
from torchloom.core.loggers.logger import Logger
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies.strategy import Strategy
from torchloom.core.utils.collections import apply_to_collection
from torchloom.core.utils.seed import seed_everything
from torchloom.fabric import checks
from torchloom.fabric.arguments import (
    as_list,
    check_filter,
    check_loggers,
    check_module,
    check_optimizers,
    check_state,
    load_raw_state,
    positive,
    unwrap_module,
    unwrap_optimizer,
    unwrap_state,
    update_plain_values,
)
from torchloom.fabric.checks import FabricUsageError
from torchloom.fabric.connector import FabricConnector
from torchloom.fabric.data import setup_dataloader
from torchloom.fabric.hooks import call_hook
from torchloom.fabric.wrappers import FabricDataLoader, FabricModule, FabricOptimizer

__all__ = ["Fabric"]


class Fabric:
    """Runs a hand-written PyTorch loop on any accelerator, strategy, precision and number of devices or nodes.

    ``accelerator``, ``strategy``, ``devices``, ``num_nodes``, ``precision`` and ``plugins`` are resolved
    by core's connector (names or instances; ``"auto"`` picks for this machine); under ``torchloom run``
    the CLI's options win over them. ``callbacks`` are any objects (see :meth:`call`); ``loggers`` are
    core ``Logger`` instances (see :meth:`log`). With spawn-based strategies the ``Fabric`` object is
    pickled to every worker, so callbacks and loggers must pickle too.
    """

    def __init__(
        self,
        *,
        accelerator: str | Accelerator = "auto",
        strategy: str | Strategy = "auto",
        devices: DeviceSpec = "auto",
        num_nodes: int = 1,
        precision: str | int | Precision | None = None,
        plugins: PluginArg | Sequence[PluginArg] | None = None,
        callbacks: Any | list[Any] | None = None,
        loggers: Logger | Iterable[Logger] | None = None,
    ) -> None:
        connector = FabricConnector(
            accelerator=accelerator,
            strategy=strategy,
            devices=devices,
            num_nodes=num_nodes,
            precision=precision,
            plugins=plugins,
        )
        setup = connector.resolve()
        self._strategy = setup.strategy
        self._accelerator = setup.accelerator
        self._precision = setup.precision
        self._callbacks = as_list(callbacks)
        self._loggers = check_loggers(loggers)
        self._token = uuid.uuid4().hex  # tells this Fabric's set-up modules from another Fabric's
        self._joint_modules: list[nn.Module] = []  # for backward(model=None) with a joint-setup strategy
        self._launched = False
        if connector.cli_used:  # `torchloom run` started this process as one of the workers
            self._strategy.setup_environment()
            self._launched = True

    # ------------------------------------------------------------------ properties
    @property
    def strategy(self) -> Strategy:
        return self._strategy

    @property
    def accelerator(self) -> Accelerator:
        return self._accelerator

    @property
    def precision(self) -> Precision:
        return self._precision

    @property
    def device(self) -> torch.device:
        """The device this process computes on."""
        return self._strategy.root_device

    @property
    def global_rank(self) -> int:
        return self._strategy.global_rank

    @property
    def local_rank(self) -> int:
        return self._strategy.local_rank

    @property
    def node_rank(self) -> int:
        return self._strategy.node_rank

    @property
    def world_size(self) -> int:
        return self._strategy.world_size

    @property
    def is_global_zero(self) -> bool:
        return self._strategy.is_global_zero

    @property
    def loggers(self) -> list[Logger]:
        return list(self._loggers)

    @property
    def logger(self) -> Logger | None:
        """The first logger, or ``None`` without loggers."""
        return self._loggers[0] if self._loggers else None

    # ------------------------------------------------------------------ processes
    def launch(self, function: Callable[..., Any] | None = None, *args: Any, **kwargs: Any) -> Any:
        """Starts the worker processes the strategy needs and runs ``function(fabric, *args, **kwargs)`` in each.

        Returns rank 0's result. Without workers to start (one device; under ``torchloom run``, torchrun
        or SLURM) it sets this process up and calls ``function`` here. Strategy ``"ddp"`` re-runs the
        script as the workers: this process waits for them and exits, so code after ``launch()`` runs
        in the workers only. Spawn/fork strategies need ``function``.
        """
        if function is not None and not callable(function):
            raise ConfigurationError(f"launch(function={function!r}): function must be callable, or None.")
        if self._launched:  # a worker already: nothing to start
            return self._run_in_worker(function, *args, **kwargs)
        launcher = self._strategy.launcher
        if launcher is None:
            self._strategy.setup_environment()
            return self._run_in_worker(function, *args, **kwargs)
        if function is None and not launcher.reruns_script:
            raise FabricUsageError(
                f"{type(self._strategy).__name__} starts its workers with {type(launcher).__name__}, which runs a "
                "function in them: call fabric.launch(train) with a function `def train(fabric): ...` "
                "(defined at module level for spawn). Only strategy 'ddp' can re-run the whole script."
            )
        return launcher.launch(self._run_in_worker, function, *args, **kwargs)

    def _run_in_worker(self, function: Callable[..., Any] | None, *args: Any, **kwargs: Any) -> Any:
        self._launched = True
        if function is None:
            return None
        try:
            return function(self, *args, **kwargs)
        finally:
            for logger in self._loggers:
                logger.save()  # forked workers exit without running exit handlers

    def _require_launched(self, action: str) -> None:
        if self._launched:
            return
        if self._strategy.launcher is None:  # one process: prepare it on first use
            self._strategy.setup_environment()
            self._launched = True
            return
        raise FabricUsageError(
            f"fabric.{action}() needs the worker processes of {type(self._strategy).__name__}, which do not exist "
            "yet. Call fabric.launch() first (fabric.launch(function) for spawn/fork strategies), or run the "
            "script with `torchloom run`."
        )

    # ------------------------------------------------------------------ setup
    @overload
    def setup(self, module: nn.Module, *, move_to_device: bool = True) -> FabricModule: ...

    @overload
    def setup(
        self, module: nn.Module, *optimizers: Optimizer, scheduler: Any = None, move_to_device: bool = True
    ) -> Any: ...

    def setup(
        self, module: nn.Module, *optimizers: Optimizer, scheduler: Any = None, move_to_device: bool = True
    ) -> Any:
        """Sets up ``module`` with its optimizers (and LR scheduler) for the strategy and precision.

        Returns the ``FabricModule``, or ``(module, *optimizers)`` with optimizers, plus the scheduler last
        when one is given. ``move_to_device=False`` leaves the parameters where they are. Optimizers built
        over the module before it is sharded (FSDP, model parallel) are pointed at the sharded parameters.
        """
        self._require_launched("setup")
        check_module(module, self._token)
        check_optimizers(optimizers)
        before = list(module.parameters())
        module = self._prepare_module(module, move_to_device)
        if optimizers or scheduler is not None:
            forward_module, raw, scheduler = self._strategy.setup_module_and_optimizers(
                module, list(optimizers), scheduler
            )
        else:
            forward_module, raw = self._strategy.setup_module(module), []
        fabric_module = self._wrap_module(forward_module, module, before)
        wrapped = [self._wrap_optimizer(o, given, forward_module) for o, given in zip(raw, optimizers, strict=True)]
        if not optimizers and scheduler is None:
            return fabric_module
        return (fabric_module, *wrapped) if scheduler is None else (fabric_module, *wrapped, scheduler)

    def setup_module(self, module: nn.Module, move_to_device: bool = True) -> FabricModule:
        """Sets up ``module`` alone; its optimizers follow with :meth:`setup_optimizers`."""
        self._require_launched("setup_module")
        check_module(module, self._token)
        before = list(module.parameters())
        module = self._prepare_module(module, move_to_device)
        return self._wrap_module(self._strategy.setup_module(module), module, before)

    @overload
    def setup_optimizers(self, optimizer: Optimizer, /) -> FabricOptimizer: ...

    @overload
    def setup_optimizers(self, *optimizers: Optimizer) -> Any: ...

    def setup_optimizers(self, *optimizers: Optimizer) -> Any:
        """Sets up optimizers built on a module from :meth:`setup_module`; one ``FabricOptimizer`` or a tuple."""
        self._require_launched("setup_optimizers")
        if self._strategy.requires_joint_setup:
            raise FabricUsageError(
                f"{type(self._strategy).__name__} sets up a module together with its optimizers: call "
                "`model, optimizer = fabric.setup(model, optimizer)` instead of setup_module + setup_optimizers."
            )
        if not optimizers:
            raise ConfigurationError("setup_optimizers() got no optimizer; pass one or more torch optimizers.")
        check_optimizers(optimizers)
        for optimizer in optimizers:
            checks.check_not_replaced(optimizer, type(self._strategy).__name__)
        wrapped = [
            self._wrap_optimizer(self._strategy.setup_optimizer(o), o, checks.module_holding(o)) for o in optimizers
        ]
        return wrapped[0] if len(wrapped) == 1 else tuple(wrapped)

    @overload
    def setup_dataloaders(
        self, dataloader: DataLoader[Any], /, *, use_distributed_sampler: bool = True, move_to_device: bool = True
    ) -> FabricDataLoader: ...

    @overload
    def setup_dataloaders(
        self, *dataloaders: DataLoader[Any], use_distributed_sampler: bool = True, move_to_device: bool = True
    ) -> Any: ...

    def setup_dataloaders(
        self, *dataloaders: DataLoader[Any], use_distributed_sampler: bool = True, move_to_device: bool = True
    ) -> Any:
        """Gives each ``DataLoader`` a distributed sampler where the strategy splits data, and moves its batches.

        Returns one ``FabricDataLoader`` or a tuple. ``use_distributed_sampler=False`` keeps the
        sampler (bring your own); ``move_to_device=False`` leaves batches where the loader puts them.
        """
        self._require_launched("setup_dataloaders")
        if not dataloaders:
            raise ConfigurationError("setup_dataloaders() got no dataloader; pass one or more DataLoaders.")
        sampler_kwargs = self._strategy.distributed_sampler_kwargs if use_distributed_sampler else None
        # an XLA strategy's process_dataloader returns a loader that moves batches itself
        device = self.device if move_to_device and not self._strategy.uses_xla else None
        wrapped = [setup_dataloader(d, self._strategy, sampler_kwargs, self.global_rank, device) for d in dataloaders]
        return wrapped[0] if len(wrapped) == 1 else tuple(wrapped)

    def _prepare_module(self, module: nn.Module, move_to_device: bool) -> nn.Module:
        module = self._precision.convert_module(module)
        if move_to_device:
            self._strategy.module_to_device(module)
        return module

    def _wrap_module(self, forward_module: nn.Module, module: nn.Module, before: list[nn.Parameter]) -> FabricModule:
        # sharding strategies replace the parameters: the old ones stay known, to catch optimizers holding them
        after = list(module.parameters())
        checks.register_params([*before, *after], self._token)
        checks.register_replaced(before, after)
        checks.register_module(forward_module)
        if self._strategy.requires_joint_setup:
            self._joint_modules.append(forward_module)
        guard = checks.customizes_backward(self._strategy, self._precision)
        return FabricModule(forward_module, module, self._precision, guard_backward=guard)

    def _wrap_optimizer(self, optimizer: Optimizer, given: Optimizer, module: nn.Module | None) -> FabricOptimizer:
        checks.register_optimizer(optimizer)
        checks.register_optimizer(given)
        return FabricOptimizer(optimizer, self._strategy, self._callbacks, module=module)

    # ------------------------------------------------------------------ the step
    def backward(self, tensor: Tensor, *args: Any, model: FabricModule | None = None, **kwargs: Any) -> None:
        """``tensor.backward(*args, **kwargs)`` the strategy's and precision's way (loss scaling, ...).

        ``model`` names the module when a joint-setup strategy (DeepSpeed) holds several.
        """
        self._require_launched("backward")
        if model is not None:
            module: nn.Module | None = unwrap_module(model, "backward(model=...)")
        elif len(self._joint_modules) > 1:
            raise FabricUsageError(
                f"{type(self._strategy).__name__} needs to know which module this backward is for: several were "
                "set up. Call fabric.backward(loss, model=that_model)."
            )
        else:
            module = self._joint_modules[0] if self._joint_modules else None
        with checks.fabric_backward():
            self._strategy.backward(tensor, module, *args, **kwargs)

    def clip_gradients(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        clip_val: float | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = True,
    ) -> Tensor | None:
        """Clips the gradients of ``optimizer``'s parameters by value (``clip_val``) or total norm (``max_norm``).

        Exactly one of the two. Returns the total norm before clipping for ``max_norm``, ``None`` for
        ``clip_val``. Gradients are unscaled first under ``16-mixed``.
        """
        if (clip_val is None) == (max_norm is None):
            raise ConfigurationError(
                f"clip_gradients got clip_val={clip_val!r} and max_norm={max_norm!r}: pass exactly one of them."
            )
        forward_module = unwrap_module(module, "clip_gradients")
        raw = unwrap_optimizer(optimizer, "clip_gradients")
        if max_norm is not None:
            return self._strategy.clip_gradients_norm(
                forward_module, raw, positive("max_norm", max_norm), float(norm_type), error_if_nonfinite
            )
        assert clip_val is not None
        self._strategy.clip_gradients_value(forward_module, raw, positive("clip_val", clip_val))
        return None

    def no_backward_sync(self, module: FabricModule, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
        """Inside it, backward skips the gradient sync across processes (gradient accumulation).

        The first backward outside it syncs the accumulated gradients. A no-op with one process.
        """
        if not isinstance(module, FabricModule):
            raise ConfigurationError(
                f"no_backward_sync needs the FabricModule that fabric.setup returned, got {type(module).__name__}."
            )
        return self._strategy.no_backward_sync(module.forward_module, enabled)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The precision's forward context (autocast for mixed precision), for code outside the model's forward."""
        return self._precision.forward_context()

    def init_module(self, empty_init: bool | None = None) -> contextlib.AbstractContextManager[None]:
        """Builds a model inside it directly on the device, in the precision's dtype.

        ``empty_init=True`` skips weight initialisation (for weights a checkpoint will overwrite). With a
        sharded strategy (FSDP, model parallel) it builds the model on the meta device instead, and
        ``setup`` gives each rank memory and initial values for its own shards only.
        """
        self._require_launched("init_module")
        return self._strategy.module_init_context(empty_init)

    def init_tensor(self) -> contextlib.AbstractContextManager[None]:
        """New tensors made inside it land on the device with the precision's dtype."""
        self._require_launched("init_tensor")
        return self._strategy.tensor_init_context()

    def to_device(self, obj: Any) -> Any:
        """Moves a module, a tensor or a nested collection of tensors to this process's device."""
        if isinstance(obj, nn.Module):
            self._strategy.module_to_device(obj)
            return obj
        return self._strategy.batch_to_device(obj)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on local rank 0 only, flushed at once.

        The line goes out in one write, so output of other processes sharing the terminal does not cut into it.
        """
        if self.local_rank != 0:
            return
        file = kwargs.pop("file", None) or sys.stdout
        kwargs.pop("flush", None)
        text = io.StringIO()
        builtins.print(*args, file=text, **kwargs)
        file.write(text.getvalue())
        file.flush()

    # ------------------------------------------------------------------ collectives
    def barrier(self, name: str | None = None) -> None:
        """Waits until every process gets here."""
        self._require_launched("barrier")
        self._strategy.barrier(name)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (anything picklable), on every rank."""
        self._require_launched("broadcast")
        return self._strategy.broadcast(obj, src)

    def all_gather(self, data: Any, group: Any | None = None, sync_grads: bool = False) -> Any:
        """Every rank's tensors (numbers become tensors), stacked along a new first dimension of size world_size."""
        self._require_launched("all_gather")
        return self._strategy.all_gather(self._as_device_tensors(data), group=group, sync_grads=sync_grads)

    def all_reduce(self, data: Any, group: Any | None = None, reduce_op: str = "mean") -> Any:
        """Reduces tensors (numbers become tensors) across ranks: "mean", "sum", "max", "min" or "product"."""
        self._require_launched("all_reduce")
        parse_reduce_op(reduce_op)  # a bad name fails with one process too
        return self._strategy.all_reduce(self._as_device_tensors(data), group=group, reduce_op=reduce_op)

    def _as_device_tensors(self, data: Any) -> Any:
        device = self.device
        data = apply_to_collection(data, (int, float), lambda x: torch.tensor(x, device=device))
        return self._strategy.batch_to_device(data)

    @contextlib.contextmanager
    def rank_zero_first(self, local: bool = False) -> Generator[None, None, None]:
        """Rank 0 (local rank 0 of each node with ``local=True``) runs the block first; the others wait, then run it.

        For work the others reuse, such as downloading a dataset. Waiting is bound by the process
        group's timeout.
        """
        self._require_launched("rank_zero_first")
        first = (self.local_rank if local else self.global_rank) == 0
        if not first:
            self._strategy.barrier("rank_zero_first")
        yield
        if first:
            self._strategy.barrier("rank_zero_first")

    # ------------------------------------------------------------------ checkpoints
    def save(
        self, path: Any, state: dict[str, Any], filter: dict[str, Callable[[str, Any], bool]] | None = None
    ) -> None:
        """Saves ``state`` (names -> modules, optimizers, anything with ``state_dict``, plain values) to ``path``.

        The strategy decides who writes (rank 0 for DDP; for FSDP / model parallel every rank its shards
        into the directory ``path``, or rank 0 one file with ``state_dict_type="full"``) and every rank
        waits until it is on disk. :meth:`load` reads either form, on any number of processes.
        ``filter`` maps a name of ``state`` to ``keep(key, value)``, applied to that entry's state dict.
        Add ``"precision": fabric.precision`` to keep a grad scaler's state. The checkpoint also records the
        torchloom version that wrote it under the reserved name ``"torchloom_version"`` (:meth:`load` refuses a
        checkpoint of a newer torchloom, and leaves the name out of what it returns).
        """
        self._require_launched("save")
        state = check_state(state, "save")
        if VERSION_KEY in state:
            raise ConfigurationError(
                f"save(state=...) holds the name {VERSION_KEY!r}, which torchloom reserves for the version that "
                "wrote the checkpoint. Valid: any other name."
            )
        checkpoint = {**unwrap_state(state), VERSION_KEY: running_version()}
        with checks.stepping_through_fabric():  # DCP may step an optimizer without state to create it
            self._strategy.save_checkpoint(path, checkpoint, filter=check_filter(filter, state))

    def load(
        self, path: Any, state: dict[str, Any] | None = None, strict: bool = True, *, weights_only: bool = True
    ) -> dict[str, Any]:
        """Restores the objects of ``state`` in place from ``path``; returns the checkpoint entries not restored.

        Plain values in ``state`` are replaced by the checkpoint's. Without ``state``, returns the whole
        checkpoint. ``strict=True``: a name missing from the checkpoint, or a module's missing or
        unexpected keys, raise (listing them). ``weights_only=False`` allows arbitrary pickled objects: only
        for a file you trust. A checkpoint that cannot be loaded (truncated or corrupt, not a checkpoint, a
        pickle that would run code, an incomplete checkpoint directory, or written by a newer torchloom) raises
        ``CheckpointError`` before anything is restored. The recorded ``"torchloom_version"`` is not returned.
        """
        self._require_launched("load")
        if state is None:
            checkpoint = self._strategy.load_checkpoint(path, None, strict=strict, weights_only=weights_only)
            checkpoint.pop(VERSION_KEY, None)
            return checkpoint
        state = check_state(state, "load")
        unwrapped = unwrap_state(state)
        with checks.stepping_through_fabric():  # DCP may step an optimizer without state to create it
            remainder = self._strategy.load_checkpoint(path, unwrapped, strict=strict, weights_only=weights_only)
        update_plain_values(state, unwrapped)
        remainder.pop(VERSION_KEY, None)
        return remainder

    def load_raw(self, path: Any, obj: Any, strict: bool = True, *, weights_only: bool = True) -> None:
        """Loads a plain state-dict file (``torch.save(model.state_dict(), path)``) into a module or optimizer."""
        self._require_launched("load_raw")
        with checks.stepping_through_fabric():
            load_raw_state(self._strategy, path, obj, strict=strict, weights_only=weights_only)

    # ------------------------------------------------------------------ loggers and callbacks
    def log(self, name: str, value: float | Tensor, step: int | None = None) -> None:
        """Logs one scalar to every logger (only global rank 0 writes)."""
        self.log_dict({name: value}, step=step)

    def log_dict(self, metrics: Mapping[str, float | Tensor], step: int | None = None) -> None:
        """Logs scalars to every logger (only global rank 0 writes)."""
        for logger in self._loggers:
            logger.log_metrics(metrics, step=step)

    def call(self, hook_name: str, *args: Any, **kwargs: Any) -> None:
        """Calls ``hook_name(*args, **kwargs)`` on every callback that has it, with the kwargs it accepts."""
        call_hook(self._callbacks, hook_name, *args, **kwargs)

    # ------------------------------------------------------------------ randomness and ordering
    @staticmethod
    def seed_everything(seed: int, workers: bool = False) -> int:
        """Seeds Python, NumPy and torch; ``workers=True`` also seeds dataloader workers (distinctly per rank)."""
        return seed_everything(seed, workers=workers)

    def __repr__(self) -> str:
        return f"Fabric(strategy={self._strategy!r}, world_size={self.world_size}, launched={self._launched})"
