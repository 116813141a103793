"""The Trainer's checkpoint: what it holds, where ``ckpt_path`` points, and restoring from it.

A checkpoint is a dict of plain data (loadable with ``torch.load(weights_only=True)``)::

    torchloom_version, epoch, global_step, state_dict, hyper_parameters, loops   (always)
    optimizer_states, lr_schedulers, precision, callbacks, datamodule, rng         (unless weights_only)

``loops["fit"]`` is the fit loop's position (``FitProgress``) and ``rng`` the random state at save
time: together they let ``fit(ckpt_path=...)`` continue exactly where the saved run was, mid-epoch
included. Anything that would need pickling is refused when saving, naming the part it is in.

Loading refuses, with ``CheckpointError`` and before anything is restored, a file that is truncated or
corrupt, not a Trainer checkpoint, a pickle that would run code, an incomplete checkpoint directory, or
one whose ``torchloom_version`` is a newer MAJOR.MINOR than the torchloom running (an older one loads).
"""

from __future__ import annotations

import glob
import inspect
import io
import os
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from torchloom.core.checkpoint import deepspeed as deepspeed_io
from torchloom.core.checkpoint import distributed as sharded_io
from torchloom.core.checkpoint.checks import check_checkpoint
from torchloom.core.checkpoint.io import TorchCheckpointIO
from torchloom.core.errors import CheckpointError, ConfigurationError
from torchloom.core.utils.rank_zero import rank_zero_warn
from torchloom.trainer.hparams import check_hparams_serializable, plain_hparams
from torchloom.trainer.rng import capture_rng

if TYPE_CHECKING:
    from torchloom.trainer.module import LoomModule
    from torchloom.trainer.trainer import Trainer

__all__ = [
    "check_ckpt_path",
    "dump_checkpoint",
    "load_module_from_checkpoint",
    "read_checkpoint",
    "resolve_ckpt_path",
    "restore_after_setup",
    "restore_training_state",
    "restore_weights",
]

M = TypeVar("M", bound="LoomModule")
SPECIAL_PATHS = ("last", "best")
_SMALL_PARTS = ("loops", "lr_schedulers", "precision", "callbacks", "datamodule", "rng")


def dump_checkpoint(trainer: Trainer, weights_only: bool = False) -> dict[str, Any]:
    """The checkpoint dict of the trainer's current state (every rank builds it; the strategy writes it)."""
    from torchloom.trainer import __version__

    module = trainer.loom_module
    check_hparams_serializable(module.hparams)
    progress = trainer._progress
    progress.metrics = {key: value.detach().cpu() for key, value in trainer.callback_metrics.items()}
    checkpoint: dict[str, Any] = {
        "torchloom_version": __version__,
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "state_dict": trainer._adapter.module_state_dict(module),
        "hyper_parameters": plain_hparams(module.hparams),
        "loops": {"fit": progress.state_dict()},
    }
    if not weights_only:
        adapter = trainer._adapter
        checkpoint["optimizer_states"] = [adapter.optimizer_state(o) for o in trainer.optimizers]
        checkpoint["lr_schedulers"] = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
        checkpoint["precision"] = adapter.precision.state_dict()
        checkpoint["callbacks"] = {cb.state_key: cb.state_dict() for cb in trainer.callbacks}
        datamodule = trainer.datamodule
        checkpoint["datamodule"] = datamodule.state_dict() if datamodule is not None else {}
        checkpoint["rng"] = capture_rng()
        for callback in trainer.callbacks:
            callback.on_save_checkpoint(trainer, module, checkpoint)
    module.on_save_checkpoint(checkpoint)
    _check_loadable(checkpoint)
    return checkpoint


def _check_loadable(checkpoint: dict[str, Any]) -> None:
    """Refuses a checkpoint that ``torch.load(weights_only=True)`` could not read back (small parts only:
    weights and optimizer states are tensors and numbers)."""
    for key, value in checkpoint.items():
        if key in ("state_dict", "optimizer_states", "hyper_parameters"):
            continue
        parts = value.items() if key in ("callbacks", "loops") and isinstance(value, dict) else [(None, value)]
        for name, part in parts:
            if not _round_trips(part):
                where = f"checkpoint[{key!r}]" + (f"[{name!r}]" if name is not None else "")
                raise ConfigurationError(
                    f"{where} holds a value that torch.load(weights_only=True) refuses to load (it needs pickling): "
                    f"{part!r:.200}. Keep checkpoint state to plain values: None, bool, int, float, str, tensors, "
                    "and lists/tuples/dicts of them."
                )


def _round_trips(value: Any) -> bool:
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception:
        return False
    return True


def check_ckpt_path(ckpt_path: str | os.PathLike[str] | None) -> None:
    """Fails early (before any process starts) for a ``ckpt_path`` that is neither a file nor "last"/"best"."""
    if ckpt_path is None or ckpt_path in SPECIAL_PATHS:
        return
    if not isinstance(ckpt_path, (str, os.PathLike)):
        raise ConfigurationError(
            f"ckpt_path={ckpt_path!r} is not valid. Valid: a checkpoint file path, {SPECIAL_PATHS[0]!r}, "
            f"{SPECIAL_PATHS[1]!r} or None."
        )
    if not os.path.exists(ckpt_path):
        raise ConfigurationError(
            f"ckpt_path={os.fspath(ckpt_path)!r} does not exist. Valid: the path of an existing checkpoint file, "
            "'last' (the newest last checkpoint of the ModelCheckpoint callback), 'best' or None."
        )


def resolve_ckpt_path(trainer: Trainer, ckpt_path: str | os.PathLike[str] | None) -> str | None:
    """The file ``ckpt_path`` means, agreed by every rank (``"last"`` with nothing saved yet: ``None``)."""
    if ckpt_path is None:
        return None
    if ckpt_path == "best":
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        if not best:
            raise ConfigurationError(
                "ckpt_path='best' needs a ModelCheckpoint callback that has saved a best checkpoint in this Trainer; "
                f"{'there is no ModelCheckpoint' if callback is None else 'it has none yet'}. Valid: a file path, or "
                "'last'."
            )
        return str(trainer._adapter.broadcast(best))
    if ckpt_path == "last":
        found = trainer._adapter.broadcast(_find_last(trainer) if trainer.is_global_zero else None)
        if found is None:
            rank_zero_warn("ckpt_path='last' found no checkpoint; training starts from the beginning.")
        return found
    return os.fspath(ckpt_path)


def _find_last(trainer: Trainer) -> str | None:
    candidates: list[str] = []
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "last_model_path", ""):
            candidates.append(callback.last_model_path)
        dirpath = getattr(callback, "dirpath", None)
        if dirpath:
            candidates += glob.glob(os.path.join(glob.escape(os.fspath(dirpath)), "last*.ckpt"))
    complete = [path for path in candidates if _is_complete(path)]
    return max(complete, key=os.path.getmtime) if complete else None


def _is_complete(path: str) -> bool:
    """A checkpoint file (written atomically), or a checkpoint directory whose save finished (its last file is there).

    A save cut short leaves a directory without the file written last; ``ckpt_path="last"`` never picks it."""
    return os.path.isfile(path) or _is_checkpoint_directory(path)


def read_checkpoint(trainer: Trainer, path: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` as one dict, read before the strategy sets the module up.

    ``None`` for a sharded checkpoint (a folder) that the strategy loads in place after setup
    (``restore_checkpoint_after_setup``): each rank then reads only its shards. Another strategy reads
    a sharded checkpoint whole, so a checkpoint of a sharded run resumes under DDP or on one device.
    Optimizer states come back in ``optimizer.state_dict()``'s form (by position), whatever the file.
    """
    if not _is_checkpoint_directory(path):
        checkpoint = trainer._adapter.load_checkpoint(path)
    elif trainer.strategy.restore_checkpoint_after_setup:
        return None
    elif sharded_io.is_sharded_checkpoint(path):
        checkpoint = sharded_io.load_sharded(path)
    else:
        checkpoint = deepspeed_io.load_consolidated(path)
    checkpoint = _check_trainer_checkpoint(checkpoint, path)
    states = checkpoint.get("optimizer_states")
    if isinstance(states, list):  # sharded saves key them by parameter name; every strategy loads positions
        checkpoint["optimizer_states"] = [sharded_io.to_indexed(state) for state in states]
    return checkpoint


def _check_trainer_checkpoint(checkpoint: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """``checkpoint`` if it is a Trainer checkpoint this torchloom can read (a dict with ``state_dict``, not written
    by a newer torchloom); else ``CheckpointError``."""
    checked = check_checkpoint(checkpoint, path)
    if "state_dict" not in checked:
        raise CheckpointError(
            f"{os.fspath(path)!r} is not a Trainer checkpoint (it has no 'state_dict'; keys: "
            f"{sorted(map(str, checked))}). Valid: a checkpoint written by Trainer.save_checkpoint or ModelCheckpoint; "
            "a state dict saved by hand loads with module.load_state_dict(torch.load(path, weights_only=True))."
        )
    return checked


def _is_checkpoint_directory(path: str | os.PathLike[str]) -> bool:
    """A checkpoint written by every rank (DCP's sharded format, or DeepSpeed's)."""
    return sharded_io.is_sharded_checkpoint(path) or deepspeed_io.is_deepspeed_checkpoint(path)


def _saved_skeleton(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The top-level entries of a checkpoint directory (tensors and engine-held parts as placeholders)."""
    if sharded_io.is_sharded_checkpoint(path):
        skeleton: dict[str, Any] = sharded_io.read_meta(path)["skeleton"]
        return skeleton
    return deepspeed_io.skeleton(path)


def restore_after_setup(
    trainer: Trainer, path: str, checkpoint: dict[str, Any] | None, wrapped: torch.nn.Module, fn: str
) -> None:
    """Restores what the set-up module and (for ``fit``) the training state need from the checkpoint.

    ``checkpoint`` is ``read_checkpoint``'s result. When it is ``None`` the strategy loads the sharded
    checkpoint's weights and optimizer states straight into ``wrapped`` and the optimizers; the
    ``on_load_checkpoint`` hooks then see the rest of it (no ``state_dict`` / ``optimizer_states``).
    """
    if checkpoint is not None:
        if trainer.strategy.restore_checkpoint_after_setup:
            restore_weights(trainer, checkpoint, wrapped)
        if fn == "fit":
            restore_training_state(trainer, checkpoint)
        return
    saved = _saved_skeleton(path)
    entries: dict[str, Any] = {"state_dict": wrapped}
    with_optimizers = fn == "fit" and "optimizer_states" in saved
    if with_optimizers:
        _check_counts(trainer, len(saved["optimizer_states"]), len(saved.get("lr_schedulers", [])))
        entries["optimizer_states"] = list(trainer.optimizers)
    rest = trainer._adapter.load_checkpoint_into(path, entries)
    trainer.loom_module.on_load_checkpoint(rest)
    if fn == "fit":
        restore_training_state(trainer, rest, optimizers_loaded=with_optimizers)


def restore_weights(trainer: Trainer, checkpoint: dict[str, Any], into: torch.nn.Module) -> None:
    """``module.on_load_checkpoint``, then the weights into ``into`` (the module, or what wraps it)."""
    trainer.loom_module.on_load_checkpoint(checkpoint)
    trainer._adapter.load_module_state_dict(into, checkpoint["state_dict"])


def restore_training_state(trainer: Trainer, checkpoint: dict[str, Any], optimizers_loaded: bool = False) -> None:
    """Optimizers (unless ``optimizers_loaded`` in place already), schedulers, precision, the loop's position,
    callbacks, datamodule and random state."""
    module = trainer.loom_module
    required = ("lr_schedulers", "loops") if optimizers_loaded else ("optimizer_states", "lr_schedulers", "loops")
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise ConfigurationError(
            f"The checkpoint has no {missing}, so training cannot resume from it (was it saved with weights_only=True?). "
            "Valid: a full checkpoint, or load the weights with Module.load_from_checkpoint(path) and fit without "
            "ckpt_path."
        )
    configs, scheduler_states = trainer.lr_scheduler_configs, checkpoint["lr_schedulers"]
    states = [] if optimizers_loaded else checkpoint["optimizer_states"]
    _check_counts(trainer, len(trainer.optimizers) if optimizers_loaded else len(states), len(scheduler_states))
    for optimizer, state in zip(trainer.optimizers, states):
        trainer._adapter.load_optimizer_state(optimizer, state)
    for config, state in zip(configs, scheduler_states):
        config.scheduler.load_state_dict(state)
    trainer._adapter.precision.load_state_dict(checkpoint.get("precision", {}))
    trainer._progress.load_state_dict(checkpoint["loops"].get("fit", {}))
    callback_states = checkpoint.get("callbacks", {})
    for callback in trainer.callbacks:
        callback.on_load_checkpoint(trainer, module, checkpoint)
        if callback.state_key in callback_states:
            callback.load_state_dict(callback_states[callback.state_key])
    datamodule = trainer.datamodule
    if datamodule is not None and checkpoint.get("datamodule"):
        datamodule.load_state_dict(checkpoint["datamodule"])
    trainer._resume_rng = checkpoint.get("rng")


def _check_counts(trainer: Trainer, optimizers: int, schedulers: int) -> None:
    made, configs = len(trainer.optimizers), len(trainer.lr_scheduler_configs)
    if optimizers != made or schedulers != configs:
        raise ConfigurationError(
            f"The checkpoint holds {optimizers} optimizer(s) and {schedulers} scheduler(s), but "
            f"configure_optimizers() made {made} and {configs}. Valid: the same configuration as the run that saved it."
        )


def load_module_from_checkpoint(
    cls: type[M],
    path: str | os.PathLike[str],
    map_location: Any = None,
    strict: bool = True,
    **overrides: Any,
) -> M:
    """``cls`` rebuilt from the checkpoint's hyper-parameters (``overrides`` win), with its weights loaded.

    ``path`` is a checkpoint file or a sharded checkpoint folder (read whole to the CPU, in this process alone).
    """
    if sharded_io.is_sharded_checkpoint(path):
        checkpoint = sharded_io.load_sharded(path, distributed=False)
    elif deepspeed_io.is_deepspeed_checkpoint(path):
        checkpoint = deepspeed_io.load_consolidated(path)
    else:
        checkpoint = TorchCheckpointIO().load_checkpoint(
            path, map_location=map_location if map_location is not None else "cpu", weights_only=True
        )
    checkpoint = _check_trainer_checkpoint(checkpoint, path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    parameters = inspect.signature(cls.__init__).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        names = {p.name for p in parameters}
        hparams = {k: v for k, v in hparams.items() if k in names}
    module = cls(**{**hparams, **overrides})
    module.configure_model()  # layers built late (sharded runs) exist in the checkpoint too
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return module
