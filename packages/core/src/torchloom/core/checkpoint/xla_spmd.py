"""What the XLA SPMD strategy reads a sharded checkpoint into, so that every tensor arrives already sharded.

A sharded checkpoint (``checkpoint/distributed.py``) is read with torch-xla's ``SPMDLoadPlanner``: DCP
copies each device's shard of a saved tensor straight into the matching shard of a live XLA tensor. The
live tensors are the modules' own parameters and buffers, and, for optimizers, new empty tensors sharded
like the parameter they belong to. Reading optimizer state whole instead would put a full copy of it on
every device (replicated), the memory FSDP sharding is there to save, until the next step reshards it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torchloom.core.accelerators.xla import import_torch_xla
from torchloom.core.checkpoint import distributed as sharded_io

__all__ = ["inner_module", "live_targets", "owner_module", "shard_like_parameters"]


def inner_module(module: nn.Module) -> nn.Module:
    """The user's module inside FSDPv2's wrapper (its state dict keys carry no wrapper prefix)."""
    inner = getattr(module, "_orig_module", None)
    return inner if isinstance(inner, nn.Module) else module


def owner_module(optimizer: Optimizer, state: dict[str, Any], key: str) -> nn.Module:
    """The user's module in ``state`` that holds ``optimizer``'s parameters (see ``owner_of``)."""
    return inner_module(sharded_io.owner_of(optimizer, state, key))


def live_targets(
    path: str | os.PathLike[str], meta: dict[str, Any], state: dict[str, Any], strict: bool
) -> dict[str, Any]:
    """For each module and optimizer (or list of them) of ``state`` that the checkpoint holds, the tensors to read
    it into. Entries saved as plain state (the Trainer's ``state_dict``, ``optimizer_states``) count when their
    form fits the object.

    New tensors have device data only once their graph has run: run it (``torch_xla.sync(wait=True)``)
    before handing them to the planner, which reads each shard's position from the device data.
    """
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    stored = FileSystemReader(path).read_metadata().state_dict_metadata
    live: dict[str, Any] = {}
    for key, obj in state.items():
        kind, saved = meta["kinds"].get(key), meta["skeleton"].get(key)
        optimizers = sharded_io.as_optimizers(obj)
        if isinstance(obj, nn.Module) and kind in ("module", "data") and isinstance(saved, dict):
            module = inner_module(obj)
            sharded_io.check_module_keys(module, saved.keys(), strict)
            live[key] = module.state_dict()  # aliases of the parameters: DCP fills each device's shard in place
        elif optimizers is not None and kind in ("optimizer", "optimizers", "data") and _fits(saved, obj):
            prefixes: list[list[Any]] = (
                [[key]] if isinstance(obj, Optimizer) else [[key, i] for i in range(len(optimizers))]
            )
            targets = []
            for prefix, optimizer in zip(prefixes, optimizers, strict=True):
                params = _parameters_by_reference(optimizer, owner_module(optimizer, state, key))
                items = []
                for tensor_path in meta["tensor_paths"]:
                    if tensor_path[: len(prefix)] == prefix:
                        relative = tensor_path[len(prefix) :]
                        items.append((relative, _target(relative, stored[sharded_io.flat_key(tensor_path)], params)))
                targets.append(_nest(items))
            live[key] = targets[0] if isinstance(obj, Optimizer) else targets
    return live


def _fits(saved: Any, obj: Any) -> bool:
    """Whether saved optimizer state has the form of ``obj``: one state dict, or a list as long as ``obj``."""
    if isinstance(obj, Optimizer):
        return isinstance(saved, dict) and "param_groups" in saved
    return isinstance(saved, (list, tuple)) and len(saved) == len(obj)


def _parameters_by_reference(optimizer: Optimizer, module: nn.Module) -> dict[Any, Tensor]:
    """``optimizer``'s parameters by the keys its saved state may use: position (``optimizer.state_dict()``)
    and name (the form sharded checkpoints hold)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = sharded_io.parameter_names(module, optimizer)
    return {**dict(enumerate(params)), **dict(zip(names, params, strict=True))}


def shard_like_parameters(optimizer: Optimizer) -> None:
    """Shards each state tensor of ``optimizer`` that has its parameter's shape like that parameter, if it is not
    sharded yet: state loaded whole (from a full file, or by the Trainer) arrives replicated on every device."""
    torch_xla = import_torch_xla("torch_xla", "XLA SPMD checkpoints")
    for group in optimizer.param_groups:
        for param in group["params"]:
            sharding = torch_xla._XLAC._get_xla_op_sharding(param)
            if not sharding:
                continue
            for value in optimizer.state.get(param, {}).values():
                if not isinstance(value, Tensor) or value.device.type != "xla" or value.shape != param.shape:
                    continue
                if not torch_xla._XLAC._get_xla_op_sharding(value):
                    torch_xla._XLAC._xla_mark_sharding(value, sharding)


def _target(relative_path: list[Any], stored: Any, params: dict[Any, Tensor]) -> Tensor:
    """An empty tensor for one saved optimizer state tensor: on the device and sharded like its parameter when
    it has the parameter's shape (``exp_avg``, ``momentum_buffer``), else on the CPU (``step``)."""
    size, dtype = stored.size, stored.properties.dtype
    # optimizer state: ["state", parameter name or position, state name]
    param = params.get(relative_path[1]) if len(relative_path) == 3 and relative_path[0] == "state" else None
    if param is None or tuple(size) != tuple(param.shape):
        return torch.empty(size, dtype=dtype)
    torch_xla = import_torch_xla("torch_xla", "XLA SPMD checkpoints")
    target = torch.empty(size, dtype=dtype, device=param.device)
    sharding = torch_xla._XLAC._get_xla_op_sharding(param)  # None for a replicated parameter
    if sharding:
        torch_xla._XLAC._xla_mark_sharding(target, sharding)
    return target


def _nest(items: list[tuple[list[Any], Tensor]]) -> dict[Any, Any]:
    """``[(["state", "w", "exp_avg"], t)]`` -> ``{"state": {"w": {"exp_avg": t}}}``."""
    nested: dict[Any, Any] = {}
    for parts, tensor in items:
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = tensor
    return nested
