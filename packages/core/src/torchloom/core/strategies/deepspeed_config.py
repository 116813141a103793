"""The DeepSpeed config torchloom generates, the user's override merged over it, and what DeepSpeed compiles.

DeepSpeed builds some of its C++ ops with g++ the first time they are used (46 s to 2 min each on 2 CPU
cores, then cached under ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). torchloom keeps
the default path free of them:

- the optimizer is the user's torch optimizer (never DeepSpeed's FusedAdam / DeepSpeedCPUAdam), so no
  optimizer op is built; with optimizer offload DeepSpeed is told to accept it
  (``zero_force_ds_cpu_optimizer: false``);
- on the CPU accelerator the shared-memory all-reduce op (``deepspeed_shm_comm``), which DeepSpeed builds
  whenever its communication backend starts but uses only for inference all-reduce, is skipped; training
  collectives go through the gloo process group either way.

A config that names a DeepSpeed optimizer (``"optimizer": {"type": "Adam"}``) does build its op: torchloom
logs which one before DeepSpeed starts, so a silent minute has an explanation.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

from torchloom.core.errors import ConfigurationError, choices

__all__ = [
    "STAGES",
    "generated_config",
    "merge_configs",
    "ops_built_on_first_use",
    "read_user_config",
    "without_cpu_shm_op",
]

log = logging.getLogger(__name__)

STAGES = (1, 2, 3)
_OPTIMIZER_OPS = {"adam": "fused_adam", "adamw": "fused_adam", "lamb": "fused_lamb", "lion": "fused_lion"}
_OFFLOAD_OPTIMIZER_OPS = {"adam": "cpu_adam", "adamw": "cpu_adam", "adagrad": "cpu_adagrad", "lion": "cpu_lion"}


def read_user_config(config: str | os.PathLike[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """The user's config as a dict (a copy): from a mapping, or a JSON file; ``None`` gives ``{}``."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigurationError(
            f"config={config!r} is not valid. Valid: a dict, the path of a JSON file, or None (generate it)."
        )
    path = Path(config)
    if not path.is_file():
        raise ConfigurationError(
            f"config={os.fspath(config)!r}: no such file. Valid: the path of an existing DeepSpeed JSON config, "
            "or a dict."
        )
    try:
        loaded = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"config={os.fspath(config)!r} is not valid JSON: {exc}.") from exc
    if not isinstance(loaded, dict):
        raise ConfigurationError(
            f"config={os.fspath(config)!r} holds a JSON {type(loaded).__name__}; a DeepSpeed config is a JSON object."
        )
    return loaded


def generated_config(
    *,
    stage: int,
    offload_optimizer: bool,
    offload_parameters: bool,
    micro_batch_size: int,
    accumulation_steps: int,
    gradient_clipping: float,
) -> dict[str, Any]:
    """The config torchloom writes for these choices (precision sections are added by the precision)."""
    zero: dict[str, Any] = {"stage": stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the user's torch optimizer
        "zero_force_ds_cpu_optimizer": False,  # ... also with optimizer offload (no cpu_adam build)
        "steps_per_print": 2**31 - 1,  # DeepSpeed's own progress lines off; loggers report progress
        "wall_clock_breakdown": False,
    }


def merge_configs(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in: nested sections merge key by key, other values are replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def check_stage(stage: object) -> int:
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in STAGES:  # 2.0 == 2, but not a stage
        raise ConfigurationError(f"stage={stage!r} is not valid. Valid: {choices(STAGES)} (ZeRO stages).")
    assert isinstance(stage, int)
    return stage


def ops_built_on_first_use(config: Mapping[str, Any]) -> list[str]:
    """The C++ ops DeepSpeed will build (unless cached) for ``config``'s optimizer section."""
    optimizer = config.get("optimizer")
    if not isinstance(optimizer, Mapping):
        return []
    kind = str(optimizer.get("type", "")).lower()
    params = optimizer.get("params") or {}
    if isinstance(params, Mapping) and params.get("torch_adam"):
        return []
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    table = _OFFLOAD_OPTIMIZER_OPS if offload.get("device") in ("cpu", "nvme") else _OPTIMIZER_OPS
    op = table.get(kind)
    return [op] if op else []


def announce_op_builds(config: Mapping[str, Any]) -> None:
    """Logs each op DeepSpeed is about to compile for ``config`` (once per process)."""
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    for op in ops_built_on_first_use(config):
        log.warning(
            "DeepSpeed builds its C++ op %r with g++ on first use (1-2 minutes on a small machine; cached in %s). "
            "To skip it, pass a torch optimizer to setup instead of the config's 'optimizer' section.",
            op,
            cache,
        )


@contextlib.contextmanager
def without_cpu_shm_op(accelerator_is_cpu: bool) -> Generator[None, None, None]:
    """While DeepSpeed starts its communication backend, skip building the CPU shared-memory all-reduce op.

    The op serves DeepSpeed's inference all-reduce only; building it costs a minute of g++ on first use.
    Outside the CPU accelerator nothing changes.
    """
    module = sys.modules.get("deepspeed.comm.torch")  # by sys.modules: `deepspeed.comm.torch` shadows torch
    if not accelerator_is_cpu or module is None or not hasattr(module, "build_shm_op"):
        yield
        return
    original = getattr(module, "build_shm_op")  # noqa: B009 (an attribute mypy cannot see)
    setattr(module, "build_shm_op", lambda: None)  # noqa: B010
    try:
        yield
    finally:
        setattr(module, "build_shm_op", original)  # noqa: B010
