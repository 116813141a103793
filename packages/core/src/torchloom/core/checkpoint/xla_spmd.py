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

__all__ = ["inner_module", "live_targets", "shard_like_parameters"]


def inner_module(module: nn.Module) -> nn.Module:
    """The user's module inside FSDPv2's wrapper (its state dict keys carry no wrapper prefix)."""
    inner = getattr(module, "_orig_module", None)
    return inner if isinstance(inner, nn.Module) else module


def live_targets(
    path: str | os.PathLike[str], meta: dict[str, Any], state: dict[str, Any], strict: bool
) -> dict[str, Any]:
    """For each module and optimizer of ``state`` that the checkpoint holds, the tensors to read it into.

    New tensors have device data only once their graph has run: run it (``torch_xla.sync(wait=True)``)
    before handing them to the planner, which reads each shard's position from the device data.
    """
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    stored = FileSystemReader(path).read_metadata().state_dict_metadata
    live: dict[str, Any] = {}
    for key, obj in state.items():
        kind = meta["kinds"].get(key)
        if isinstance(obj, nn.Module) and kind == "module":
            module = inner_module(obj)
            sharded_io.check_module_keys(module, meta["skeleton"][key].keys(), strict)
            live[key] = module.state_dict()  # aliases of the parameters: DCP fills each device's shard in place
        elif isinstance(obj, Optimizer) and kind == "optimizer":
            owner = inner_module(sharded_io.owner_of(obj, state, key))
            params = [p for group in obj.param_groups for p in group["params"]]
            by_name = dict(zip(sharded_io.parameter_names(owner, obj), params, strict=True))
            paths = [p for p in meta["tensor_paths"] if p[0] == key]
            live[key] = _nest([(p[1:], _target(p, stored[sharded_io.flat_key(p)], by_name)) for p in paths])
    return live


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


def _target(tensor_path: list[Any], stored: Any, params: dict[str, Tensor]) -> Tensor:
    """An empty tensor for one saved optimizer state tensor: on the device and sharded like its parameter when
    it has the parameter's shape (``exp_avg``, ``momentum_buffer``), else on the CPU (``step``)."""
    size, dtype = stored.size, stored.properties.dtype
    # named optimizer state: [key, "state", parameter name, state name]
    param = params.get(tensor_path[2]) if len(tensor_path) == 4 and tensor_path[1] == "state" else None
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
