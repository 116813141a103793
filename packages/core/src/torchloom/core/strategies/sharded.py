"""ShardedStrategy: the base of strategies whose parameters become DTensors over a ``DeviceMesh``.

FSDP (``fully_shard``) and DTensor tensor parallelism share everything but how they shard a module:
the mesh, meta-device initialisation, re-binding optimizers to the sharded parameters, clipping by
the global norm, skipping gradient sync, and checkpoints written by every rank with
``torch.distributed.checkpoint`` (DCP) that load on any number of ranks.

Heavy torch.distributed modules (DTensor, DCP, FSDP) are imported inside the methods that use them:
importing this module costs nothing over ``import torch``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from abc import abstractmethod
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from torchloom.core.accelerators.accelerator import Accelerator
from torchloom.core.checkpoint import distributed as sharded_io
from torchloom.core.checkpoint.checks import check_entries, refuse_directory
from torchloom.core.checkpoint.io import CheckpointIO
from torchloom.core.environments.environment import ClusterEnvironment
from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.precision.precision import Precision
from torchloom.core.strategies import sharded_params
from torchloom.core.strategies.parallel import DEFAULT_TIMEOUT, ParallelStrategy, check_start_method, launcher_for
from torchloom.core.strategies.strategy import StateFilter, parameters_with_grads, unwrap_module
from torchloom.core.watchdog import DEFAULT_STALL_TIMEOUT

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["STATE_DICT_TYPES", "ShardedStrategy"]

STATE_DICT_TYPES = ("sharded", "full")


class ShardedStrategy(ParallelStrategy):
    """Shared base of FSDP and model parallel: subclasses build the mesh and shard the module.

    ``state_dict_type="sharded"`` saves a checkpoint directory written by all ranks (DCP);
    ``"full"`` gathers one file on rank 0 that loads anywhere. Both kinds load whatever this is set to.
    ``start_method`` picks how the workers start, as for DDP (``"popen"``: the script is run again).
    """

    restore_checkpoint_after_setup = True  # products load checkpoints into the already sharded module
    initializes_empty_modules = True  # meta tensors are materialized shard by shard in setup_module
    supports_inference_mode = False  # fully_shard's all-gather buffers made under inference_mode break training

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: datetime.timedelta = DEFAULT_TIMEOUT,
        state_dict_type: str = "sharded",
        start_method: str = "popen",
        stall_timeout: datetime.timedelta | None = DEFAULT_STALL_TIMEOUT,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            stall_timeout=stall_timeout,
        )
        if state_dict_type not in STATE_DICT_TYPES:
            raise ConfigurationError(
                f"state_dict_type={state_dict_type!r} is not valid. Valid: {choices(STATE_DICT_TYPES)}."
            )
        self._state_dict_type = state_dict_type
        self._start_method = check_start_method(start_method)
        self._device_mesh: DeviceMesh | None = None

    @property
    def state_dict_type(self) -> str:
        return self._state_dict_type

    @property
    def start_method(self) -> str:
        return self._start_method

    @property
    def device_mesh(self) -> DeviceMesh:
        if self._device_mesh is None:
            raise ConfigurationError(
                f"{type(self).__name__}.device_mesh exists once setup_environment() has run in the worker "
                "(Fabric.launch() / Trainer.fit() do it)."
            )
        return self._device_mesh

    @abstractmethod
    def _build_device_mesh(self) -> DeviceMesh:
        """The mesh of this job; called once at the end of ``setup_environment()``."""

    @override
    def configure_launcher(self) -> None:
        self._launcher = launcher_for(self, self._start_method)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self._device_mesh is None:
            self._device_mesh = self._build_device_mesh()

    @override
    def teardown(self) -> None:
        self._device_mesh = None
        super().teardown()

    # ------------------------------------------------------------------ building and sharding the module
    @override
    @contextlib.contextmanager
    def module_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """``empty_init=True``: parameters on the meta device, so no rank ever holds the whole model."""
        if not empty_init:
            with super().module_init_context(empty_init):
                yield
            return
        with torch.device("meta"), self.precision.module_init_context():
            yield

    @override
    def module_to_device(self, module: nn.Module) -> None:
        if not sharded_params.has_meta_tensors(module):  # meta tensors are materialised after sharding
            super().module_to_device(module)

    def materialize(self, module: nn.Module, device: torch.device | None = None) -> None:
        """Gives meta parameters/buffers memory on ``device`` (default: the root device) and initial values.

        Each module holding meta tensors runs ``reset_parameters()`` on full-size stand-ins, one module at
        a time, and keeps its part of each (so no rank ever holds the whole model). Every rank draws from
        ``torch.manual_seed(<rank 0's seed>)``: all ranks agree, and the weights equal those of the same
        model built normally right after seeding (when its modules initialise in registration order).
        """
        if sharded_params.has_meta_tensors(module):  # the same on every rank, so the broadcast is collective
            sharded_params.materialize_meta(
                module, device or self.root_device, seed=self.broadcast(torch.initial_seed())
            )

    @override
    def setup_module_and_optimizers(
        self, module: nn.Module, optimizers: list[Optimizer], scheduler: Any = None
    ) -> tuple[nn.Module, list[Optimizer], Any]:
        """Shards ``module``, then points ``optimizers`` (built over the unsharded one) at the new parameters."""
        owners = sharded_params.parameter_owners(module)
        for optimizer in optimizers:
            sharded_params.check_rebindable(optimizer, owners, type(self).__name__)
        module = self.setup_module(module)
        for optimizer in optimizers:
            sharded_params.rebind(optimizer, owners)
        return module, [self.setup_optimizer(o) for o in optimizers], scheduler

    # ------------------------------------------------------------------ the step
    @override
    def clip_gradients_norm(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = True,
    ) -> Tensor:
        """Clips to the global norm over all shards; returns it (a plain tensor, the same on every rank)."""
        self.precision.unscale_gradients(optimizer)
        params = parameters_with_grads(optimizer)
        total = _total_norm([p.grad for p in params if p.grad is not None], norm_type)
        if error_if_nonfinite and not self.precision.skips_nonfinite_steps and not torch.isfinite(total):
            raise RuntimeError(
                f"The total norm of order {norm_type} of the gradients is {total.item()}, so they cannot be "
                "clipped. Pass error_if_nonfinite=False to clip anyway."
            )
        for group in _by_mesh(params):
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total

    @override
    def clip_gradients_value(self, module: nn.Module, optimizer: Optimizer, clip_val: float) -> None:
        self.precision.unscale_gradients(optimizer)
        for group in _by_mesh(parameters_with_grads(optimizer)):
            torch.nn.utils.clip_grad_value_(group, clip_val)

    @override
    @contextlib.contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Generator[None, None, None]:
        """Inside, backward accumulates unsharded local gradients; the next synced backward reduce-scatters all."""
        from torch.distributed.fsdp import FSDPModule

        fsdp_modules = [m for m in module.modules() if isinstance(m, FSDPModule)] if enabled else []
        for fsdp_module in fsdp_modules:
            fsdp_module.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for fsdp_module in fsdp_modules:
                fsdp_module.set_requires_gradient_sync(True, recurse=False)

    # ------------------------------------------------------------------ state dicts
    @override
    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        """``"sharded"``: this rank's DTensor shards; ``"full"``: full CPU tensors on rank 0 (``{}`` elsewhere)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(unwrap_module(module), options=self._options())

    @override
    def load_module_state_dict(self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Loads a sharded (DTensor) or full (plain tensors, on every rank) state dict into the sharded module."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        module = unwrap_module(module)
        sharded_io.check_module_keys(module, state_dict.keys(), strict)
        options = self._options(full=not sharded_io.holds_dtensors(state_dict), strict=strict, offload=False)
        set_model_state_dict(module, state_dict, options=options)

    @override
    def get_optimizer_state(self, optimizer: Optimizer, module: nn.Module | None = None) -> dict[str, Any]:
        """``"sharded"``: state keyed by parameter name, DTensor values (DCP's form). ``"full"``: on rank 0,
        exactly what ``optimizer.state_dict()`` gives for the unsharded model (``{}`` on other ranks)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        module = unwrap_module(self._require_module(module, "get_optimizer_state"))
        state = get_optimizer_state_dict(module, optimizer, options=self._options())
        if self._state_dict_type == "full":
            return sharded_io.optimizer_state_to_indexed(state) if state else {}
        return state

    @override
    def load_optimizer_state(
        self, optimizer: Optimizer, state_dict: dict[str, Any], module: nn.Module | None = None
    ) -> None:
        """Loads any of: a sharded (named, DTensor) state, a full named one, or a plain ``optimizer.state_dict()``."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        module = unwrap_module(self._require_module(module, "load_optimizer_state"))
        if sharded_io.is_indexed_optimizer_state(state_dict):
            state_dict = sharded_io.optimizer_state_to_named(state_dict, sharded_io.parameter_names(module, optimizer))
        options = self._options(full=not sharded_io.holds_dtensors(state_dict), offload=False)
        set_optimizer_state_dict(module, optimizer, state_dict, options=options)
        # DCP's full-state path hands hyperparameters back as lists ("betas": (0.9, 0.999) -> [0.9, 0.999])
        for group, saved in zip(optimizer.param_groups, state_dict["param_groups"], strict=True):
            group.update({key: value for key, value in saved.items() if key != "params"})

    def _options(self, full: bool | None = None, strict: bool = True, offload: bool = True) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        full = self._state_dict_type == "full" if full is None else full
        # a full state dict is gathered tensor by tensor onto rank 0's CPU, never the whole model per rank
        return StateDictOptions(full_state_dict=full, cpu_offload=full and offload, strict=strict)

    def _require_module(self, module: nn.Module | None, method: str) -> nn.Module:
        if module is None:
            raise ConfigurationError(
                f"{type(self).__name__}.{method} needs module=: the optimizer state of a sharded model is keyed by "
                "parameter name, so pass the module that owns the optimizer's parameters."
            )
        return module

    # ------------------------------------------------------------------ checkpoints
    @override
    def convert_state(self, state: dict[str, Any], filter: StateFilter | None = None) -> dict[str, Any]:
        """Like the base, and optimizers (alone, or in lists/tuples) are paired with their module in ``state``."""
        converted: dict[str, Any] = {}
        for key, obj in state.items():
            optimizers = sharded_io.as_optimizers(obj)
            if isinstance(obj, nn.Module):
                value: Any = self.get_module_state_dict(obj)
            elif optimizers is not None:
                states = [self.get_optimizer_state(o, sharded_io.owner_of(o, state, key)) for o in optimizers]
                value = states[0] if isinstance(obj, Optimizer) else states
            elif callable(getattr(obj, "state_dict", None)) and not isinstance(obj, dict):
                value = obj.state_dict()
            else:
                value = obj
            if filter is not None and key in filter and isinstance(value, dict):
                value = {k: v for k, v in value.items() if filter[key](k, v)}
            converted[key] = value
        return converted

    @override
    def save_checkpoint(
        self, path: str | os.PathLike[str], state: dict[str, Any], filter: StateFilter | None = None
    ) -> None:
        """``"sharded"``: a directory written by all ranks (DCP) + the non-tensor state; ``"full"``: one file.

        Either way a failed save leaves a previous checkpoint at ``path`` as it was.
        """
        checkpoint = self.convert_state(state, filter)
        if self._state_dict_type == "sharded":
            sharded_io.save_sharded(path, checkpoint, sharded_io.kinds_of(state), self)
            return
        failure: BaseException | None = None
        if self.is_global_zero:
            try:
                self.checkpoint_io.save_checkpoint(checkpoint, path)
            except Exception as error:  # tell the other ranks before raising, so that none waits forever
                failure = error
        if not self.reduce_boolean_decision(failure is None):
            raise failure or RuntimeError(f"Saving the checkpoint {str(path)!r} failed on rank 0; see its error.")

    @override
    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        state: dict[str, Any] | None = None,
        strict: bool = True,
        weights_only: bool = True,
    ) -> dict[str, Any]:
        """Loads a sharded directory (resharded to this run's mesh) or a full file into ``state``'s objects.

        Returns the checkpoint's entries that were not loaded into an object of ``state``.
        """
        state = {} if state is None else state
        if sharded_io.is_sharded_checkpoint(path):
            meta = sharded_io.read_meta(path)
            check_entries(path, state, meta["kinds"], strict)
            checkpoint = sharded_io.load_sharded(path, self._live_state(meta, state, strict), meta=meta)
        elif Path(path).is_dir():
            refuse_directory(path)  # says what an incomplete checkpoint lacks
        else:
            checkpoint = self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
            check_entries(path, state, checkpoint.keys(), strict)
        for key, obj in state.items():
            if key not in checkpoint:
                continue
            value = checkpoint.pop(key)
            optimizers = sharded_io.as_optimizers(obj)
            if isinstance(obj, nn.Module):
                self.load_module_state_dict(obj, value, strict=strict)
            elif optimizers is not None:
                values = [value] if isinstance(obj, Optimizer) else list(value)
                for optimizer, optimizer_state in zip(optimizers, values, strict=True):
                    self.load_optimizer_state(optimizer, optimizer_state, sharded_io.owner_of(optimizer, state, key))
            elif callable(getattr(obj, "load_state_dict", None)) and not isinstance(obj, dict):
                obj.load_state_dict(value)
            else:
                state[key] = value
        return checkpoint

    def _live_state(self, meta: dict[str, Any], state: dict[str, Any], strict: bool) -> dict[str, Any]:
        """This rank's shards of the modules and optimizers of ``state`` that the checkpoint holds.

        DCP loads into them in place, each rank only its part, resharding from however it was saved.
        """
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        live: dict[str, Any] = {}
        for key, obj in state.items():
            kind = meta["kinds"].get(key)
            optimizers = sharded_io.as_optimizers(obj)
            if kind == "data":  # saved as plain state (the Trainer's checkpoint dict): load it in place all the same
                kind = _kind_of_saved_state(meta["skeleton"].get(key), obj)
            if isinstance(obj, nn.Module) and kind == "module":
                module = unwrap_module(obj)
                sharded_io.check_module_keys(module, meta["skeleton"][key].keys(), strict)
                live[key] = get_model_state_dict(module, options=self._options(full=False))
            elif optimizers is not None and kind == ("optimizer" if isinstance(obj, Optimizer) else "optimizers"):
                states = [
                    get_optimizer_state_dict(sharded_io.owner_of(o, state, key), o, options=self._options(full=False))
                    for o in optimizers
                ]
                live[key] = states[0] if isinstance(obj, Optimizer) else states
        return live


def _kind_of_saved_state(saved: Any, obj: Any) -> str:
    """``"module"`` / ``"optimizer(s)"`` when plain saved state has the form ``obj``'s state takes, else ``"data"``.

    A module's state dict (a dict) fits a module; DCP's named optimizer state (one per optimizer) fits
    the optimizers, whose indexed ``optimizer.state_dict()`` form would not match the live state's keys.
    """

    def named(value: Any) -> bool:
        return isinstance(value, dict) and "param_groups" in value and not sharded_io.is_indexed_optimizer_state(value)

    optimizers = sharded_io.as_optimizers(obj)
    if isinstance(obj, nn.Module) and isinstance(saved, dict):
        return "module"
    if isinstance(obj, Optimizer) and named(saved):
        return "optimizer"
    if optimizers is not None and isinstance(saved, (list, tuple)) and len(saved) == len(optimizers):
        return "optimizers" if all(named(value) for value in saved) else "data"
    return "data"


def _mesh_key(tensor: Tensor) -> Any:
    mesh = getattr(tensor, "device_mesh", None)  # DTensors only; their collectives need one mesh per group
    return None if mesh is None else (id(mesh), tuple(getattr(tensor, "placements", ())))


def _by_mesh(params: list[Tensor]) -> list[list[Tensor]]:
    """``params`` grouped by the mesh and placements of their gradients (plain gradients form one group)."""
    groups: dict[Any, list[Tensor]] = {}
    for param in params:
        assert param.grad is not None
        groups.setdefault(_mesh_key(param.grad), []).append(param)
    return list(groups.values())


def _total_norm(grads: list[Tensor], norm_type: float) -> Tensor:
    """The norm of all gradients together, over every shard: a plain tensor, the same on every rank."""
    from torch.distributed.tensor import DTensor

    if not grads:
        return torch.tensor(0.0)
    groups: dict[Any, list[Tensor]] = {}
    for grad in grads:
        groups.setdefault(_mesh_key(grad), []).append(grad)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # reduces over the sharded dims
    device = norms[0].device
    return torch.nn.utils.get_total_norm([n.to(device) for n in norms], norm_type)
