"""The rules behind the Connector: plugin sorting, precision spellings, interactive sessions and the
combinations of accelerator, devices, strategy and launcher that cannot run.

Kept apart from ``connector.py`` so the connector reads as the order of resolution and this module
as the list of rules. Every rule raises ``ConfigurationError`` naming the bad value and the valid ones.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from torchloom.core.checkpoint.io import CheckpointIO
from torchloom.core.environments.environment import ClusterEnvironment
from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.precision.precision import Precision
from torchloom.core.registry import PRECISIONS, STRATEGIES
from torchloom.core.strategies.parallel import ParallelStrategy
from torchloom.core.strategies.strategy import Strategy

__all__ = [
    "PRECISION_ALIASES",
    "Plugins",
    "check_interactive_launcher",
    "check_num_nodes",
    "check_spans_all_devices",
    "check_strategy_arg",
    "check_strategy_fits",
    "choose_one",
    "describe",
    "is_interactive_session",
    "precision_name",
    "sort_plugins",
]

# Legacy spellings Lightning users know, mapped to the canonical name (accepted, silently normalised).
PRECISION_ALIASES: dict[str, str] = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}

_PLUGIN_KINDS: dict[str, type] = {
    "precision": Precision,
    "cluster_environment": ClusterEnvironment,
    "checkpoint_io": CheckpointIO,
}
_ACCEPTED_PLUGINS = "a Precision, ClusterEnvironment or CheckpointIO instance, or a list with at most one of each"


@dataclass(frozen=True)
class Plugins:
    """The ``plugins`` argument sorted by kind."""

    precision: Precision | None = None
    cluster_environment: ClusterEnvironment | None = None
    checkpoint_io: CheckpointIO | None = None


def sort_plugins(plugins: object) -> Plugins:
    """Sorts ``plugins`` (None, one plugin, or a list/tuple of them) into one slot per kind."""
    if plugins is None:
        return Plugins()
    items: Sequence[object] = plugins if isinstance(plugins, (list, tuple)) else [plugins]
    found: dict[str, Any] = {}
    for plugin in items:
        kind = next((kind for kind, cls in _PLUGIN_KINDS.items() if isinstance(plugin, cls)), None)
        if kind is None:
            raise ConfigurationError(
                f"plugins got {plugin!r} (type {type(plugin).__name__}), which is not a plugin torchloom knows. "
                f"Accepted: {_ACCEPTED_PLUGINS}."
            )
        if kind in found:
            raise ConfigurationError(
                f"plugins holds two {_PLUGIN_KINDS[kind].__name__} objects, {found[kind]!r} and {plugin!r}; "
                f"choose one. Accepted: {_ACCEPTED_PLUGINS}."
            )
        found[kind] = plugin
    return Plugins(**found)


def precision_name(precision: object) -> str:
    """The registry name for a precision spelling: a registered name, or a legacy alias (16, 32, 64, "bf16")."""
    if isinstance(precision, (int, str)) and not isinstance(precision, bool):
        key = str(precision).strip().lower()
        key = PRECISION_ALIASES.get(key, key)
        if key in PRECISIONS:
            return key
    aliases = [64, 32, 16, "bf16"]
    raise ConfigurationError(
        f"precision={precision!r} is not valid. Valid: {choices(PRECISIONS.names())}, the legacy spellings "
        f"{choices(aliases)} (= '64-true', '32-true', '16-mixed', 'bf16-mixed'), or a Precision instance."
    )


def is_interactive_session() -> bool:
    """True in a REPL, IPython/Jupyter, or ``python -c``: anywhere the script cannot be re-run as a file."""
    main = sys.modules.get("__main__")
    return hasattr(sys, "ps1") or bool(sys.flags.interactive) or getattr(main, "__file__", None) is None


def check_num_nodes(num_nodes: object) -> int:
    """``num_nodes`` if it is a positive int."""
    if isinstance(num_nodes, int) and not isinstance(num_nodes, bool) and num_nodes >= 1:
        return num_nodes
    raise ConfigurationError(f"num_nodes={num_nodes!r} is not valid. Valid: a positive int such as 1, 2 or 4.")


def check_strategy_arg(strategy: object) -> str | Strategy:
    """A ``Strategy`` instance, or a known strategy name (lower-cased); ``"auto"`` included."""
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str) and (strategy.lower() == "auto" or strategy in STRATEGIES):
        return strategy.lower()
    raise ConfigurationError(
        f"strategy={strategy!r} is not valid. Valid: {choices(['auto', *STRATEGIES.names()])}, or a Strategy instance."
    )


def describe(strategy: object) -> str:
    """How to name the user's strategy argument in a message."""
    return f"strategy={strategy!r}" if isinstance(strategy, str) else f"strategy={type(strategy).__name__}(...)"


def check_strategy_fits(strategy: Strategy, label: str, devices: Sequence[torch.device], num_nodes: int) -> None:
    """Rejects a strategy that cannot drive these devices; called before anything is wired."""
    device_type = devices[0].type
    parallel = isinstance(strategy, ParallelStrategy)
    # an XLA SPMD strategy is one process that drives every device of its host
    spans_devices = getattr(strategy, "drives_all_local_devices", False) is True and num_nodes == 1
    if not parallel and not spans_devices and (len(devices) > 1 or num_nodes > 1):
        raise ConfigurationError(
            f"{label} runs one process on one device, but got {len(devices)} devices ({_show(devices)}) and "
            f"num_nodes={num_nodes}. Valid: devices=1 and num_nodes=1 with this strategy, or a multi-process "
            f"strategy such as {choices(_parallel_names())} (strategy='auto' picks one)."
        )
    if parallel and device_type == "mps":
        raise ConfigurationError(
            f"{label} is a multi-process (DDP family) strategy, which is not supported on MPS: torch.distributed "
            "cannot exchange MPS tensors. Valid on 'mps': strategy='auto' or 'single_device'; for DDP use "
            "accelerator='cpu'."
        )
    uses_xla = strategy.uses_xla
    if device_type == "xla" and not uses_xla:
        xla_names = [name for name in STRATEGIES.names() if "xla" in name]
        raise ConfigurationError(
            f"{label} cannot run on the 'tpu' accelerator: XLA devices need an XLA strategy (one whose "
            f"'uses_xla' is True). Registered XLA strategies: {choices(xla_names) or 'none (install one)'}; "
            "or choose another accelerator."
        )
    if uses_xla and device_type != "xla":
        raise ConfigurationError(
            f"{label} is an XLA strategy but the devices are {_show(devices)}. Valid: accelerator='tpu' with it, "
            "or a non-XLA strategy for this accelerator."
        )
    start_method = getattr(strategy, "start_method", None)
    available = multiprocessing.get_all_start_methods()
    if start_method in ("fork", "notebook") and "fork" not in available:
        raise ConfigurationError(
            f"{label} starts its workers with fork, which this platform ({sys.platform}) does not offer. "
            f"Valid start methods here: {choices(available)}; use strategy='ddp_spawn' or 'ddp'."
        )


def check_interactive_launcher(strategy: Strategy, label: str) -> None:
    """Rejects a launcher that must re-run a script file (or pickle ``__main__``) in a notebook or REPL."""
    launcher = strategy.launcher
    if launcher is not None and not launcher.is_interactive_compatible and is_interactive_session():
        raise ConfigurationError(
            f"{label} uses {type(launcher).__name__}, which cannot start workers from an interactive session "
            "(notebook, REPL, python -c). Valid here: strategy='ddp_notebook' (forked workers) or devices=1; "
            "or run the code as a script file."
        )


def choose_one(what: str, ours: str, theirs: str, carried: object) -> ConfigurationError:
    """The error for one object given twice: as an argument and inside the strategy (or a plugin)."""
    held = f" (holding {carried!r})" if carried is not None else ""
    return ConfigurationError(
        f"The {what} is given twice: by {ours} and by {theirs}{held}. Choose one: set it on the strategy, "
        f"or pass it to the connector, not both."
    )


def _parallel_names() -> list[str]:
    return [name for name in STRATEGIES.names() if name.startswith("ddp")]


def check_spans_all_devices(strategy: Strategy, label: str, devices: Sequence[torch.device], available: int) -> None:
    """Rejects a subset of the host's devices for a strategy that always drives all of them (XLA SPMD: its
    device mesh must hold every device the runtime sees)."""
    if getattr(strategy, "drives_all_local_devices", False) is True and len(devices) != available:
        raise ConfigurationError(
            f"{label} drives every device of this host ({available}) as one program, but the devices are "
            f"{_show(devices)}. Valid: devices='auto', -1 or {available} with it; strategy='single_xla' for one "
            "device; or make the runtime see fewer devices before the start (CPU_NUM_DEVICES on XLA's CPU backend, "
            "TPU_VISIBLE_CHIPS on a TPU host)."
        )


def _show(devices: Sequence[torch.device]) -> str:
    shown = ", ".join(str(device) for device in devices[:4])
    return shown + (", ..." if len(devices) > 4 else "")
