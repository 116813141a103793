"""Named registries for strategies, accelerators and precisions.

A name maps to a factory plus keyword arguments, so presets such as ``"ddp_spawn"`` are the same
class with other arguments. Built-ins are registered by import path (``"module:attr"``) so that
looking up one name imports only what it needs. Installed packages add names through the entry
point groups ``torchloom.strategies``, ``torchloom.accelerators`` and ``torchloom.precision``; an
entry point's name is the registered name and its object is a factory called with no arguments.
Both products resolve names here, so a plugin installed once is available in each.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from torchloom.core.errors import ConfigurationError, choices

__all__ = ["ACCELERATORS", "PRECISIONS", "STRATEGIES", "Registry"]

T = TypeVar("T")


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Any] | str
    description: str
    init_params: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> Callable[..., Any]:
        if not isinstance(self.factory, str):
            return self.factory
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


class Registry(Generic[T]):
    """Names (case-insensitive) -> factories of ``T``."""

    def __init__(self, kind: str, entry_point_group: str) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, _Entry] = {}
        self._entry_points_loaded = False

    def register(
        self,
        name: str,
        factory: Callable[..., T] | str,
        *,
        description: str = "",
        override: bool = False,
        **init_params: Any,
    ) -> None:
        """Registers ``factory(**init_params)`` under ``name``.

        ``factory`` may be a callable or an import path ``"package.module:attr"``. Registering a
        name twice is an error unless ``override=True``.
        """
        key = name.lower()
        if not override and key in self._entries:
            raise ConfigurationError(
                f"The {self.kind} name {name!r} is already registered; pass override=True to replace it."
            )
        self._entries[key] = _Entry(factory, description, dict(init_params))

    def remove(self, name: str) -> None:
        self._entries.pop(name.lower(), None)

    def get(self, name: str, **overrides: Any) -> T:
        """Builds a new instance of the object registered under ``name``."""
        entry = self._lookup(name)
        return entry.resolve()(**{**entry.init_params, **overrides})  # type: ignore[no-any-return]

    def factory(self, name: str) -> Callable[..., Any]:
        """The class or callable registered under ``name``, without building it."""
        return self._lookup(name).resolve()

    def init_params(self, name: str) -> dict[str, Any]:
        return dict(self._lookup(name).init_params)

    def description(self, name: str) -> str:
        return self._lookup(name).description

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name.lower() not in self._entries:
            self._load_entry_points()
        return name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _lookup(self, name: str) -> _Entry:
        if name not in self:
            raise ConfigurationError(f"Unknown {self.kind} {name!r}. Valid {self.kind} names: {choices(self.names())}.")
        return self._entries[name.lower()]

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            if ep.name.lower() in self._entries:
                continue  # an explicit registration in this process wins over an installed plugin
            try:
                factory = ep.load()
            except Exception as exc:  # a broken plugin must not break every other name
                warnings.warn(
                    f"Skipping the {self.kind} plugin {ep.name!r} ({ep.value}) from entry point group "
                    f"{self.entry_point_group!r}: loading it failed with {exc!r}.",
                    stacklevel=3,
                )
                continue
            self.register(ep.name, factory, description=f"plugin from {ep.value}")

    def reload_entry_points(self) -> None:
        """Looks at the installed entry points again (after installing a plugin at run time)."""
        self._entry_points_loaded = False
        self._load_entry_points()


_P = "torchloom.core"

ACCELERATORS: Registry[Any] = Registry("accelerator", "torchloom.accelerators")
ACCELERATORS.register("cpu", f"{_P}.accelerators.cpu:CPUAccelerator", description="CPU processes")
ACCELERATORS.register("cuda", f"{_P}.accelerators.cuda:CUDAAccelerator", description="NVIDIA GPUs")
ACCELERATORS.register("mps", f"{_P}.accelerators.mps:MPSAccelerator", description="Apple Metal GPUs")
ACCELERATORS.register("tpu", f"{_P}.accelerators.xla:XLAAccelerator", description="TPUs through torch-xla")

PRECISIONS: Registry[Any] = Registry("precision", "torchloom.precision")
PRECISIONS.register("64-true", f"{_P}.precision.double:DoublePrecision", description="float64 weights and math")
PRECISIONS.register("32-true", f"{_P}.precision.precision:Precision", description="float32 (default)")
PRECISIONS.register(
    "16-mixed", f"{_P}.precision.amp:MixedPrecision", description="float16 autocast + grad scaler", dtype="16-mixed"
)
PRECISIONS.register(
    "bf16-mixed", f"{_P}.precision.amp:MixedPrecision", description="bfloat16 autocast", dtype="bf16-mixed"
)
PRECISIONS.register(
    "16-true", f"{_P}.precision.half:HalfPrecision", description="float16 weights and math", dtype="16-true"
)
PRECISIONS.register(
    "bf16-true", f"{_P}.precision.half:HalfPrecision", description="bfloat16 weights and math", dtype="bf16-true"
)

STRATEGIES: Registry[Any] = Registry("strategy", "torchloom.strategies")
STRATEGIES.register(
    "single_device", f"{_P}.strategies.single_device:SingleDeviceStrategy", description="one device, one process"
)
STRATEGIES.register(
    "ddp", f"{_P}.strategies.ddp:DDPStrategy", description="DDP; re-runs the script as N workers", start_method="popen"
)
STRATEGIES.register(
    "ddp_spawn", f"{_P}.strategies.ddp:DDPStrategy", description="DDP; spawned worker processes", start_method="spawn"
)
STRATEGIES.register(
    "ddp_fork", f"{_P}.strategies.ddp:DDPStrategy", description="DDP; forked worker processes", start_method="fork"
)
STRATEGIES.register(
    "ddp_notebook",
    f"{_P}.strategies.ddp:DDPStrategy",
    description="DDP; forked workers, safe in notebooks",
    start_method="notebook",
)
STRATEGIES.register(
    "model_parallel",
    f"{_P}.strategies.model_parallel:ModelParallelStrategy",
    description="DTensor tensor parallel and/or FSDP2 over a 2-D device mesh (parallelize_fn)",
)
STRATEGIES.register(
    "fsdp", f"{_P}.strategies.fsdp:FSDPStrategy", description="fully sharded data parallel (fully_shard)"
)
STRATEGIES.register(
    "fsdp_cpu_offload",
    f"{_P}.strategies.fsdp:FSDPStrategy",
    description="fully sharded data parallel, shards kept on the CPU",
    cpu_offload=True,
)
_DEEPSPEED_NAMES: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("deepspeed", {}, "DeepSpeed ZeRO stage 2"),
    ("deepspeed_stage_1", {"stage": 1}, "DeepSpeed ZeRO stage 1: optimizer state partitioned"),
    ("deepspeed_stage_2", {"stage": 2}, "DeepSpeed ZeRO stage 2: optimizer state and gradients partitioned"),
    ("deepspeed_stage_2_offload", {"stage": 2, "offload_optimizer": True}, "ZeRO stage 2, optimizer state on the CPU"),
    ("deepspeed_stage_3", {"stage": 3}, "DeepSpeed ZeRO stage 3: parameters partitioned too"),
    (
        "deepspeed_stage_3_offload",
        {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
        "ZeRO stage 3, optimizer state and parameters on the CPU",
    ),
)
STRATEGIES.register(
    "single_xla",
    f"{_P}.strategies.single_xla:SingleDeviceXLAStrategy",
    description="one XLA device (TPU core, or XLA on the CPU), one process",
)
STRATEGIES.register(
    "xla", f"{_P}.strategies.xla:XLAStrategy", description="one process per XLA device (TPU chip), data parallel"
)
STRATEGIES.register(
    "xla_spmd",
    f"{_P}.strategies.xla_spmd:XLASPMDStrategy",
    description="one process, SPMD over every local XLA device; FSDPv2 parameter sharding",
    sharding="fsdp",
)
STRATEGIES.register(
    "xla_spmd_data",
    f"{_P}.strategies.xla_spmd:XLASPMDStrategy",
    description="one process, SPMD over every local XLA device; batches sharded, parameters replicated",
    sharding="data",
)
for _name, _kwargs, _what in _DEEPSPEED_NAMES:
    STRATEGIES.register(_name, f"{_P}.strategies.deepspeed:DeepSpeedStrategy", description=_what, **_kwargs)
