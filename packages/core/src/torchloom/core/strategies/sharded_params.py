"""What sharding does to a module's parameters, and what it takes around it.

- Meta-device models are materialised shard by shard: each module's ``reset_parameters()`` runs on
  full-size stand-ins, one module at a time, and each rank keeps its slice.
- Sharding (``fully_shard``, ``parallelize_module``) registers new DTensor parameters where the old
  ones were, so optimizers built over the unsharded module are re-bound to what now sits in each
  old parameter's place (its submodule and attribute name).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from torchloom.core.errors import ConfigurationError

__all__ = ["ParameterOwners", "check_rebindable", "has_meta_tensors", "materialize_meta", "parameter_owners", "rebind"]


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def materialize_meta(module: nn.Module, device: torch.device, seed: int) -> None:
    holders = [
        (name, sub)
        for name, sub in module.named_modules()
        if any(t.is_meta for t in (*sub.parameters(recurse=False), *sub.buffers(recurse=False)))
    ]
    unresettable = [f"{name or '<root>'} ({type(sub).__name__})" for name, sub in holders if not _resettable(sub)]
    if unresettable:
        raise ConfigurationError(
            f"These modules hold meta-device tensors but have no reset_parameters() to initialise them: "
            f"{', '.join(unresettable)}. Give them a reset_parameters() that fills their own parameters and "
            "buffers, or build the model without empty_init=True."
        )
    rng_devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        for _, sub in holders:
            _reset_module(sub, device)


def _reset_module(module: nn.Module, device: torch.device) -> None:
    """``module.reset_parameters()`` for its meta tensors: full-size stand-ins for the sharded ones, sliced after."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    meta = [name for name, t in module._parameters.items() if t is not None and t.is_meta]
    # like to_empty(), for the meta tensors only: real ones next to them keep their data
    module._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t, recurse=False)  # type: ignore[no-untyped-call]
    sharded: dict[str, Any] = {}
    for name in meta:
        param = module._parameters[name]
        # plain Shard/Replicate layouts are sliced from the full tensor; others are initialised shard by shard
        if isinstance(param, DTensor) and all(type(p) in (Shard, Replicate) for p in param.placements):
            sharded[name] = param
            whole = torch.empty(param.shape, dtype=param.dtype, device=device)
            module._parameters[name] = nn.Parameter(whole, requires_grad=param.requires_grad)
    try:
        module.reset_parameters()  # type: ignore[operator]
    finally:
        for name, param in sharded.items():
            whole = module._parameters[name]
            assert whole is not None
            mine = distribute_tensor(whole.detach(), param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(mine.to_local())
            module._parameters[name] = param


def _resettable(module: nn.Module) -> bool:
    return callable(getattr(module, "reset_parameters", None))


ParameterOwners = dict[int, tuple[nn.Module, str]]


def parameter_owners(module: nn.Module) -> ParameterOwners:
    """id(parameter) -> (the submodule holding it, its attribute name). Sharding swaps the parameter in place."""
    owners: ParameterOwners = {}
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                owners.setdefault(id(param), (sub, name))
    return owners


def check_rebindable(optimizer: Optimizer, owners: ParameterOwners, strategy: str) -> None:
    if any(optimizer.state.values()):
        raise ConfigurationError(
            f"The optimizer {type(optimizer).__name__} already has state (it has stepped); {strategy} replaces the "
            "parameters when it shards the module, so that state would be lost. Set up the optimizer before its "
            "first step, and load saved optimizer state after setup."
        )
    foreign = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in owners]
    if foreign:
        shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:5])
        raise ConfigurationError(
            f"The optimizer {type(optimizer).__name__} holds {len(foreign)} parameter(s) that are not in the module "
            f"being set up (shapes {shapes}). Create the optimizer over this module's parameters, or set up the "
            "module that owns them together with it."
        )


def rebind(optimizer: Optimizer, owners: ParameterOwners) -> None:
    """Points the optimizer's groups at the parameters now registered where the old ones were."""
    for group in optimizer.param_groups:
        fresh = [getattr(*owners[id(p)]) for p in group["params"]]
        group["params"] = list({id(p): p for p in fresh}.values())
