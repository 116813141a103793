"""Sharded checkpoints: a directory written by every rank with ``torch.distributed.checkpoint`` (DCP).

Layout of ``path/``: DCP's files (``.metadata``, ``__<rank>_0.distcp``) hold every tensor of the saved
state under a flat key (the path of keys to it, joined by ``/``: ``model/layer.weight``); ``META_FILE``,
written by rank 0, holds everything else: the nested structure with ``None`` where tensors were, the
tensors' paths, and what each top-level entry was (module, optimizer, ...). It loads with
``torch.load(weights_only=True)``. DCP reshards on load: a checkpoint of N ranks loads on M ranks.

Optimizer state appears in two forms: *named* (DCP's, keyed by parameter name; used in sharded
checkpoints) and *indexed* (``optimizer.state_dict()``'s, keyed by position; used in full files, so
they load into a plain optimizer anywhere). The helpers here convert between them.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from torchloom.core.checkpoint.checks import (
    VERSION_KEY,
    check_dcp_metadata,
    read_format_file,
    refuse_directory,
    running_version,
)
from torchloom.core.checkpoint.io import TorchCheckpointIO, _fsync_dir
from torchloom.core.errors import CheckpointError, ConfigurationError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.planner import LoadPlanner, SavePlanner

__all__ = [
    "META_FILE",
    "Coordinator",
    "as_optimizers",
    "check_module_keys",
    "flat_key",
    "flatten_tensors",
    "holds_dtensors",
    "is_indexed_optimizer_state",
    "is_sharded_checkpoint",
    "kinds_of",
    "load_sharded",
    "optimizer_state_to_indexed",
    "optimizer_state_to_named",
    "owner_of",
    "parameter_names",
    "read_meta",
    "remove_path",
    "save_sharded",
    "swap_into_place",
    "to_indexed",
]

META_FILE = "torchloom_meta.pt"
_FORMAT = "torchloom-sharded-checkpoint"
_VERSION = 1
_WRAPPER_NAMES = ("_checkpoint_wrapped_module", "_orig_mod")  # activation checkpointing, torch.compile
Path_ = list[str | int]


class Coordinator(Protocol):
    """What a save needs from the strategy: who is rank 0, and agreeing across ranks."""

    @property
    def is_global_zero(self) -> bool: ...

    def barrier(self, name: str | None = None) -> None: ...

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool: ...


# ---------------------------------------------------------------------- layout
def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a checkpoint directory written by ``save_sharded``."""
    folder = Path(path)
    return (folder / META_FILE).is_file() and (folder / ".metadata").is_file()


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The non-tensor part of a sharded checkpoint: ``kinds``, ``skeleton``, ``tensor_paths``."""
    if not is_sharded_checkpoint(path):
        if Path(path).is_dir() and ((Path(path) / META_FILE).exists() or (Path(path) / ".metadata").exists()):
            refuse_directory(path)  # says which of the two files is missing
        raise CheckpointError(
            f"{str(path)!r} is not a torchloom sharded checkpoint: expected a directory holding {META_FILE!r} and "
            "DCP's '.metadata'."
        )
    meta_file = Path(path) / META_FILE
    meta = read_format_file(meta_file, _FORMAT, _VERSION, "the sharded checkpoint's metadata")
    check_dcp_metadata(path)  # DCP unpickles it without restriction: refuse anything DCP does not write there
    return meta


def flat_key(path: Path_) -> str:
    return "/".join(str(part) for part in path)


def flatten_tensors(value: Any, prefix: Path_) -> dict[str, Tensor]:
    """Every tensor in nested dicts/lists/tuples ``value``, by flat key (``prefix`` first)."""
    found: dict[str, Tensor] = {}
    _split(value, list(prefix), found, [])
    return found


def _split(value: Any, path: Path_, tensors: dict[str, Tensor], paths: list[Path_]) -> Any:
    """``value`` with its tensors replaced by ``None``; the tensors go to ``tensors``, their paths to ``paths``."""
    if isinstance(value, Tensor):
        key = flat_key(path)
        if key in tensors:
            raise ConfigurationError(f"Two tensors of the checkpoint state map to the same key {key!r}; rename one.")
        tensors[key] = value
        paths.append(list(path))
        return None
    if isinstance(value, dict):
        return {k: _split(v, [*path, k], tensors, paths) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        items = [_split(v, [*path, i], tensors, paths) for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    return value


def _join(skeleton: Any, path: Path_, tensors: dict[str, Tensor], tensor_paths: set[str]) -> Any:
    """Inverse of ``_split``; a tensor path without a tensor in ``tensors`` is left out of its dict."""
    key = flat_key(path)
    if key in tensor_paths:
        return tensors[key]
    if isinstance(skeleton, dict):
        return {
            k: _join(v, [*path, k], tensors, tensor_paths)
            for k, v in skeleton.items()
            if flat_key([*path, k]) not in tensor_paths or flat_key([*path, k]) in tensors
        }
    if isinstance(skeleton, (list, tuple)):
        items = [_join(v, [*path, i], tensors, tensor_paths) for i, v in enumerate(skeleton)]
        return items if isinstance(skeleton, list) else tuple(items)
    return skeleton


# ---------------------------------------------------------------------- save / load
def save_sharded(
    path: str | os.PathLike[str],
    state: dict[str, Any],
    kinds: dict[str, str],
    coordinator: Coordinator,
    planner: SavePlanner | None = None,
) -> None:
    """Writes ``state`` (tensors: DTensor shards or plain) to the directory ``path``; every rank calls it.

    ``planner``: DCP's save planner, for tensors DCP's default one does not shard (torch-xla's SPMD tensors).

    Everything is written to ``.<name>.partial`` next to ``path`` first, and moved over ``path`` by rank 0
    once every rank is done, so a failed save leaves the previous checkpoint where it was. (A crash
    between the two renames of the swap leaves it at ``.<name>.replaced``.)
    """
    from torch.distributed.checkpoint.state_dict_saver import save

    target = Path(path)
    staging = target.parent / f".{target.name}.partial"
    tensors: dict[str, Tensor] = {}
    paths: list[Path_] = []
    skeleton = _split(state, [], tensors, paths)
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        VERSION_KEY: running_version(),
        "kinds": kinds,
        "skeleton": skeleton,
        "tensor_paths": paths,
    }

    def on_rank_zero(step: Any) -> None:
        failure: BaseException | None = None
        if coordinator.is_global_zero:
            try:
                step()
            except Exception as error:  # tell the other ranks first, so that none waits for rank 0 forever
                failure = error
                remove_path(staging)
        if not coordinator.reduce_boolean_decision(failure is None):
            raise failure or RuntimeError(f"Saving the checkpoint {str(target)!r} failed on rank 0; see its error.")

    def prepare() -> None:
        remove_path(staging)
        staging.mkdir(parents=True)
        TorchCheckpointIO().save_checkpoint(meta, staging / META_FILE)

    on_rank_zero(prepare)
    try:
        with warnings.catch_warnings():  # without a process group DCP warns that it writes alone, as meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            save(tensors, checkpoint_id=staging, planner=planner, no_dist=not dist.is_initialized())
    except Exception:
        if coordinator.is_global_zero:
            remove_path(staging)
        raise
    coordinator.barrier("save_sharded")
    on_rank_zero(lambda: swap_into_place(staging, target))


def load_sharded(
    path: str | os.PathLike[str],
    live: dict[str, Any] | None = None,
    *,
    meta: dict[str, Any] | None = None,
    distributed: bool | None = None,
    planner: LoadPlanner | None = None,
) -> dict[str, Any]:
    """The checkpoint at ``path`` as nested state, like a full save; all ranks of a process group call it.

    ``live``: entries (by top-level key) whose tensors DCP fills in place, such as a sharded module's
    state dict: each rank reads only its shards. Every other tensor is read whole into new CPU memory,
    and those entries' optimizer states come back in ``optimizer.state_dict()``'s form.
    ``distributed``: read together over the process group (default: when one exists), or alone.
    ``planner``: DCP's load planner, for live tensors DCP's default one cannot fill (torch-xla's SPMD tensors).
    """
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import load

    live = live or {}
    meta = read_meta(path) if meta is None else meta
    on_disk = {flat_key(tensor_path) for tensor_path in meta["tensor_paths"]}
    # live state the checkpoint lacks stays as it is (strictness is the caller's business)
    tensors = {key: t for key, t in flatten_tensors(live, []).items() if key in on_disk}
    stored = FileSystemReader(path).read_metadata().state_dict_metadata
    for tensor_path in meta["tensor_paths"]:
        key = flat_key(tensor_path)
        if tensor_path[0] not in live:
            info = stored[key]
            tensors[key] = torch.empty(info.size, dtype=info.properties.dtype)  # type: ignore[union-attr]
    if tensors:
        together = dist.is_initialized() if distributed is None else distributed
        with warnings.catch_warnings():  # DCP warns that it reads in one process, which is what was asked
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            load(tensors, checkpoint_id=path, planner=planner, no_dist=not together)
    checkpoint: dict[str, Any] = _join(meta["skeleton"], [], tensors, on_disk)
    for key, kind in meta["kinds"].items():
        if key in live:
            continue
        if kind == "optimizer":
            checkpoint[key] = optimizer_state_to_indexed(checkpoint[key])
        elif kind == "optimizers":
            checkpoint[key] = [optimizer_state_to_indexed(s) for s in checkpoint[key]]
    return checkpoint


def swap_into_place(staging: Path, target: Path) -> None:
    """Moves the finished ``staging`` directory over ``target`` (the old one is removed once replaced)."""
    replaced = target.parent / f".{target.name}.replaced"
    remove_path(replaced)
    if target.exists():
        os.replace(target, replaced)
    os.replace(staging, target)
    remove_path(replaced)
    _fsync_dir(target.parent)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---------------------------------------------------------------------- what the state holds
def kinds_of(state: dict[str, Any]) -> dict[str, str]:
    """For each entry of a state to save: ``module``, ``optimizer``, ``optimizers`` (a list), ``object`` or ``data``."""
    kinds = {}
    for key, obj in state.items():
        if isinstance(obj, nn.Module):
            kinds[key] = "module"
        elif isinstance(obj, Optimizer):
            kinds[key] = "optimizer"
        elif as_optimizers(obj) is not None:
            kinds[key] = "optimizers"
        elif callable(getattr(obj, "state_dict", None)) and not isinstance(obj, dict):
            kinds[key] = "object"
        else:
            kinds[key] = "data"
    return kinds


def as_optimizers(obj: Any) -> list[Optimizer] | None:
    """``[obj]`` for an optimizer, the list for a non-empty list/tuple of optimizers, else ``None``."""
    if isinstance(obj, Optimizer):
        return [obj]
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(o, Optimizer) for o in obj):
        return list(obj)
    return None


def owner_of(optimizer: Optimizer, state: dict[str, Any], key: str) -> nn.Module:
    """The module in ``state`` that holds all of ``optimizer``'s parameters."""
    wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for obj in state.values():
        if isinstance(obj, nn.Module) and wanted <= {id(p) for p in obj.parameters()}:
            return obj
    raise ConfigurationError(
        f"The optimizer under {key!r} needs its module next to it in the state: sharded optimizer state is keyed by "
        f"parameter name, and no module among the entries {sorted(state)} holds all its parameters. Save and load "
        "them together, e.g. {'model': model, 'optimizer': optimizer}."
    )


def holds_dtensors(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    if isinstance(value, dict):
        return any(holds_dtensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_dtensors(v) for v in value)
    return isinstance(value, DTensor)


def check_module_keys(module: nn.Module, keys: Any, strict: bool) -> None:
    """With ``strict``, a ``RuntimeError`` naming the keys that ``module``'s state dict lacks or adds."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not strict:
        return
    expected = set(get_model_state_dict(module))
    missing, unexpected = sorted(expected - set(keys)), sorted(set(keys) - expected)
    if missing or unexpected:
        raise RuntimeError(
            f"The checkpoint does not fit {type(module).__name__} (strict=True): missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}. Pass strict=False to load the keys that match."
        )


# ---------------------------------------------------------------------- optimizer state forms
def parameter_names(module: nn.Module, optimizer: Optimizer) -> list[str]:
    """The names (as DCP writes them) of ``optimizer``'s parameters, in the optimizer's order."""
    names: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        clean = ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)
        names.setdefault(id(param), clean)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(id(p) not in names for p in params):
        raise ConfigurationError(f"{type(module).__name__} does not hold all the parameters of the optimizer.")
    return [names[id(p)] for p in params]


def is_indexed_optimizer_state(state: dict[str, Any]) -> bool:
    """Whether ``state`` is in ``optimizer.state_dict()``'s form (parameters by position)."""
    groups = state.get("param_groups", [])
    return any(isinstance(p, int) for group in groups for p in group.get("params", []))


def optimizer_state_to_indexed(state: dict[str, Any]) -> dict[str, Any]:
    """Named optimizer state -> ``optimizer.state_dict()``'s form, loadable by a plain optimizer."""
    order = {name: i for i, name in enumerate(n for group in state["param_groups"] for n in group["params"])}
    return {
        "state": {order[name]: value for name, value in state.get("state", {}).items()},
        "param_groups": [{**group, "params": [order[n] for n in group["params"]]} for group in state["param_groups"]],
    }


def to_indexed(state: Any) -> Any:
    """``state`` in ``optimizer.state_dict()``'s form, whichever of the two forms it is in."""
    named = isinstance(state, dict) and state.get("param_groups") and not is_indexed_optimizer_state(state)
    return optimizer_state_to_indexed(state) if named else state


def optimizer_state_to_named(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Indexed optimizer state -> named, given the parameter names in the optimizer's order."""
    count = sum(len(group["params"]) for group in state["param_groups"])
    if count != len(names):
        raise ConfigurationError(
            f"The saved optimizer state holds {count} parameters but the optimizer has {len(names)}; "
            "it was saved for another model or optimizer."
        )
    name_of = dict(zip((i for group in state["param_groups"] for i in group["params"]), names))
    return {
        "state": {name_of[index]: value for index, value in state.get("state", {}).items()},
        "param_groups": [{**group, "params": [name_of[i] for i in group["params"]]} for group in state["param_groups"]],
    }
