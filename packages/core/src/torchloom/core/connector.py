"""Connector: the one place where user arguments become objects.

``Connector(accelerator=, strategy=, devices=, num_nodes=, precision=, plugins=)`` records the
arguments; ``resolve()`` turns them into one immutable ``Setup`` (the first call does the work, later
calls return the same ``Setup``: a strategy instance passed in is wired only once). Resolution
starts no process and creates no process group. Every invalid value or impossible combination raises
``ConfigurationError`` naming the bad value and the valid ones. The order, each step reading only
what the earlier ones decided:

1. ``plugins`` sorted into precision / cluster environment / checkpoint IO (at most one of each);
   ``num_nodes`` checked; a strategy name looked up (case-insensitive), or a ``Strategy`` instance
   read for what it already carries (accelerator, precision, checkpoint IO, cluster environment,
   devices). A carried object that contradicts an explicit argument is an error ("choose one").
2. ``precision`` spelling checked: ``None`` means ``"32-true"``; the legacy spellings 16, 32, 64 and
   ``"bf16"`` are accepted and normalised to ``"16-mixed"``, ``"32-true"``, ``"64-true"``, ``"bf16-mixed"``.
3. Accelerator: an instance; the strategy's own; a registry name; ``"gpu"`` (mps, else cuda); or
   ``"auto"``: the type of the strategy's own devices, else the first available of tpu > mps > cuda > cpu.
   It must be available.
4. Devices: the strategy's own, else ``accelerator.parse_devices(devices)``. A single-device strategy
   chosen by name with ``devices="auto"`` takes the first device.
5. Cluster environment: the plugin, the strategy's own, else ``detect_environment()``; then
   ``validate(num_devices, num_nodes)``.
6. Strategy: ``"auto"`` is single-device for one device on one node, else ``"ddp"``, or
   ``"ddp_notebook"`` in an interactive session; names are built from ``STRATEGIES``. Then the
   combination rules of ``connector_rules.check_strategy_fits``.
7. Precision built; a mixed precision gets the devices' type (``device_type``); then the strategy may swap in
   its own variant of it, or refuse it (``strategy.adapt_precision``).
8. Wiring: accelerator, precision, checkpoint IO, and for a ``ParallelStrategy`` the devices, cluster
   environment, node count and world ranks; then ``configure_launcher()``; then the interactive rule.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from torchloom.core.accelerators.accelerator import Accelerator, DeviceSpec
from torchloom.core.checkpoint.io import CheckpointIO
from torchloom.core.connector_rules import (
    Plugins,
    check_interactive_launcher,
    check_num_nodes,
    check_spans_all_devices,
    check_strategy_arg,
    check_strategy_fits,
    choose_one,
    describe,
    is_interactive_session,
    precision_name,
    sort_plugins,
)
from torchloom.core.environments.detect import detect_environment
from torchloom.core.environments.environment import ClusterEnvironment
from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.launchers.launcher import Launcher
from torchloom.core.precision.precision import Precision
from torchloom.core.registry import ACCELERATORS, PRECISIONS, STRATEGIES
from torchloom.core.strategies.parallel import ParallelStrategy
from torchloom.core.strategies.strategy import Strategy

__all__ = ["AUTO_ACCELERATOR_ORDER", "Connector", "PluginArg", "Setup"]

AUTO_ACCELERATOR_ORDER = ("tpu", "mps", "cuda", "cpu")
PluginArg = Precision | ClusterEnvironment | CheckpointIO
_DEVICE_TYPE_OF = {"tpu": "xla"}  # accelerator name -> its devices' type, where the two differ


@dataclass(frozen=True, eq=False)
class Setup:
    """The resolved, validated and wired objects a product runs with."""

    accelerator: Accelerator
    strategy: Strategy
    precision: Precision
    cluster_environment: ClusterEnvironment
    checkpoint_io: CheckpointIO
    devices: list[torch.device]  # this node's devices, one per local process
    num_nodes: int

    @property
    def launcher(self) -> Launcher | None:
        return self.strategy.launcher

    @property
    def num_devices(self) -> int:
        return len(self.devices)


@dataclass(frozen=True)
class _Carried:
    """What a strategy instance already holds before the connector wires it."""

    accelerator: Accelerator | None = None
    precision: Precision | None = None
    checkpoint_io: CheckpointIO | None = None
    cluster_environment: ClusterEnvironment | None = None
    devices: list[torch.device] | None = None


class Connector:
    """User arguments -> a ``Setup``. Products subclass it only for their own rules (see the module doc)."""

    def __init__(
        self,
        *,
        accelerator: str | Accelerator = "auto",
        strategy: str | Strategy = "auto",
        devices: DeviceSpec = "auto",
        num_nodes: int = 1,
        precision: str | int | Precision | None = None,
        plugins: PluginArg | Sequence[PluginArg] | None = None,
    ) -> None:
        self._accelerator = accelerator
        self._strategy = strategy
        self._devices = devices
        self._num_nodes = num_nodes
        self._precision = precision
        self._plugins = plugins
        self._setup: Setup | None = None

    def resolve(self) -> Setup:
        """Resolves the arguments once; raises ``ConfigurationError`` for anything that cannot run."""
        if self._setup is None:
            self._setup = self._resolve()
        return self._setup

    def _resolve(self) -> Setup:
        plugins = sort_plugins(self._plugins)
        num_nodes = check_num_nodes(self._num_nodes)
        strategy_arg = check_strategy_arg(self._strategy)
        carried = _carried_by(strategy_arg)
        self._check_conflicts(plugins, carried)
        precision_spec: Precision | str = (
            plugins.precision
            or (self._precision if isinstance(self._precision, Precision) else None)
            or carried.precision
            or precision_name("32-true" if self._precision is None else self._precision)
        )
        accelerator = self._resolve_accelerator(carried)
        devices = self._resolve_devices(accelerator, carried, strategy_arg)
        environment = plugins.cluster_environment or carried.cluster_environment or detect_environment()
        environment.validate(len(devices), num_nodes)
        strategy, chosen = _build_strategy(strategy_arg, devices, num_nodes)
        own = getattr(strategy, "_cluster_environment", None)
        if isinstance(strategy_arg, str) and not plugins.cluster_environment and own is not None:
            environment = own  # a strategy that brings its own environment by name (XLA: the runtime's ranks)
            environment.validate(len(devices), num_nodes)
        label = describe(self._strategy) + (f" (which chose {chosen!r})" if strategy_arg == "auto" else "")
        check_strategy_fits(strategy, label, devices, num_nodes)
        if getattr(strategy, "drives_all_local_devices", False) is True:
            check_spans_all_devices(strategy, label, devices, accelerator.auto_device_count())
        precision = strategy.adapt_precision(_build_precision(precision_spec, devices[0].type))
        checkpoint_io = plugins.checkpoint_io or strategy.checkpoint_io

        strategy.accelerator = accelerator
        strategy.precision = precision
        strategy.checkpoint_io = checkpoint_io
        if isinstance(strategy, ParallelStrategy):
            strategy.parallel_devices = list(devices)
            strategy.cluster_environment = environment
            strategy.num_nodes = num_nodes
            strategy.set_world_ranks()
        strategy.configure_launcher()
        check_interactive_launcher(strategy, label)
        return Setup(accelerator, strategy, precision, environment, checkpoint_io, list(devices), num_nodes)

    def _check_conflicts(self, plugins: Plugins, carried: _Carried) -> None:
        label = describe(self._strategy)
        arg = self._accelerator
        if carried.accelerator is not None and not (isinstance(arg, str) and arg.lower() == "auto"):
            same_name = isinstance(arg, str) and arg.lower() == getattr(carried.accelerator, "name", None)
            if arg is not carried.accelerator and not same_name:
                raise choose_one("accelerator", f"accelerator={arg!r}", label, carried.accelerator)
        if plugins.precision is not None and self._precision is not None:
            raise choose_one("precision", f"precision={self._precision!r}", f"plugins={self._plugins!r}", None)
        given = plugins.precision or self._precision
        if carried.precision is not None and given is not None and given is not carried.precision:
            raise choose_one("precision", f"precision={given!r}", label, carried.precision)
        for kind in ("checkpoint_io", "cluster_environment"):
            ours, theirs = getattr(plugins, kind), getattr(carried, kind)
            if ours is not None and theirs is not None and ours is not theirs:
                raise choose_one(kind.replace("_", " "), f"plugins holding {ours!r}", label, theirs)

    def _resolve_accelerator(self, carried: _Carried) -> Accelerator:
        # the strategy's own accelerator wins; _check_conflicts made sure the argument agrees with it
        arg: object = carried.accelerator if carried.accelerator is not None else self._accelerator
        if isinstance(arg, Accelerator):
            if not arg.is_available():
                raise _unavailable(arg)
            return arg
        valid = ["auto", "gpu", *ACCELERATORS.names()]
        if not isinstance(arg, str) or arg.lower() not in valid:
            raise ConfigurationError(
                f"accelerator={arg!r} is not valid. Valid: {choices(valid)}, or an Accelerator instance."
            )
        name = arg.lower()
        if name == "auto" and carried.devices:
            device_type = carried.devices[0].type
            name = next((n for n, t in _DEVICE_TYPE_OF.items() if t == device_type), device_type)
            if name not in ACCELERATORS:
                raise ConfigurationError(
                    f"The strategy's devices are of type {device_type!r}, for which no accelerator is registered. "
                    f"Registered accelerators: {choices(ACCELERATORS.names())}."
                )
        elif name in ("auto", "gpu"):
            order = AUTO_ACCELERATOR_ORDER if name == "auto" else ("mps", "cuda")
            name = next((n for n in order if _is_available(n)), name)
        if name in ("auto", "gpu") or not _is_available(name):
            if name not in ("auto", "gpu"):  # an accelerator that can say why (XLA: torch-xla missing, no device)
                explain: Callable[[], object] | None = getattr(ACCELERATORS.factory(name), "explain_unavailable", None)
                if callable(explain):
                    explain()
            raise _unavailable(arg if name in ("auto", "gpu") else name)
        accelerator = ACCELERATORS.get(name)
        if not isinstance(accelerator, Accelerator):
            raise ConfigurationError(
                f"The accelerator name {name!r} is registered with a factory that made {accelerator!r}, "
                f"which is not an Accelerator. Valid: {choices(valid)}."
            )
        return accelerator

    def _resolve_devices(
        self, accelerator: Accelerator, carried: _Carried, strategy_arg: str | Strategy
    ) -> list[torch.device]:
        auto = isinstance(self._devices, str) and self._devices.strip().lower() == "auto"
        if carried.devices:
            if not auto and _keys(self._parse_devices(accelerator)) != _keys(carried.devices):
                raise choose_one("devices", f"devices={self._devices!r}", describe(self._strategy), carried.devices)
            expected = _device_type(accelerator)
            if expected is not None and any(device.type != expected for device in carried.devices):
                raise ConfigurationError(
                    f"{describe(self._strategy)} holds the devices {[str(d) for d in carried.devices]}, which the "
                    f"{expected!r}-device accelerator {accelerator!r} cannot drive. Valid: devices of type "
                    f"{expected!r}, or accelerator='auto' to follow the strategy's devices."
                )
            return list(carried.devices)
        devices = self._parse_devices(accelerator)
        if auto and isinstance(strategy_arg, str) and _is_single_process(strategy_arg):
            devices = devices[:1]
        return devices

    def _parse_devices(self, accelerator: Accelerator) -> list[torch.device]:
        try:
            devices = accelerator.parse_devices(self._devices)
        except ConfigurationError:
            raise
        except (TypeError, ValueError) as exc:  # a custom accelerator's own parsing failed
            raise ConfigurationError(f"devices={self._devices!r} is not valid for {accelerator!r}: {exc}") from exc
        if not devices or not all(isinstance(device, torch.device) for device in devices):
            raise ConfigurationError(
                f"devices={self._devices!r} gave {devices!r} from {accelerator!r}.parse_devices; expected a non-empty "
                "list of torch.device."
            )
        return list(devices)


def _carried_by(strategy: str | Strategy) -> _Carried:
    if isinstance(strategy, str):
        return _Carried()
    devices: list[torch.device] | None
    if isinstance(strategy, ParallelStrategy):
        devices = list(getattr(strategy, "_parallel_devices", None) or []) or None
        environment = getattr(strategy, "_cluster_environment", None)
    else:
        environment = None
        try:
            devices = [strategy.root_device]
        except ConfigurationError:  # its device depends on wiring that has not happened yet
            devices = None
    return _Carried(
        accelerator=getattr(strategy, "_accelerator", None),
        precision=getattr(strategy, "_precision", None),
        checkpoint_io=getattr(strategy, "_checkpoint_io", None),
        cluster_environment=environment,
        devices=devices,
    )


def _build_strategy(arg: str | Strategy, devices: list[torch.device], num_nodes: int) -> tuple[Strategy, str]:
    """The strategy object, and the registry name it came from (the class name for an instance)."""
    if isinstance(arg, Strategy):
        return arg, type(arg).__name__
    name = arg
    if name == "auto":
        xla = devices[0].type == "xla"
        if len(devices) == 1 and num_nodes == 1:
            name = "single_xla" if xla and "single_xla" in STRATEGIES else "single_device"
        else:
            name = "xla" if xla and "xla" in STRATEGIES else "ddp_notebook" if is_interactive_session() else "ddp"
    kwargs = {"device": devices[0]} if _accepts(STRATEGIES.factory(name), "device") else {}
    strategy = STRATEGIES.get(name, **kwargs)
    if not isinstance(strategy, Strategy):
        raise ConfigurationError(
            f"The strategy name {name!r} is registered with a factory that made {strategy!r}, which is not a "
            f"Strategy. Valid: {choices(['auto', *STRATEGIES.names()])}."
        )
    return strategy, name


def _build_precision(spec: Precision | str, device_type: str) -> Precision:
    if isinstance(spec, str):
        # autocast on XLA is XLAPrecision's (the XLA strategies swap it in, adapt_precision); build by name only
        takes_device = device_type != "xla" and _accepts(PRECISIONS.factory(spec), "device_type")
        kwargs = {"device_type": device_type} if takes_device else {}
        precision = PRECISIONS.get(spec, **kwargs)
        if not isinstance(precision, Precision):
            raise ConfigurationError(
                f"The precision name {spec!r} is registered with a factory that made {precision!r}, which is not "
                f"a Precision. Valid: {choices(PRECISIONS.names())}."
            )
    else:
        precision = spec
        current = getattr(precision, "device_type", None)
        if isinstance(current, str) and current != device_type:  # autocast must target the devices in use
            try:
                setattr(precision, "device_type", device_type)  # noqa: B010 - not every Precision has it
            except AttributeError as exc:
                raise ConfigurationError(
                    f"precision={precision!r} autocasts on {current!r}, but the devices are {device_type!r}. "
                    f"Valid: a precision for {device_type!r}, or a precision name such as '16-mixed'."
                ) from exc
    if device_type == "mps" and precision.compute_dtype == torch.float64:
        raise ConfigurationError(
            f"precision={precision.name!r} needs float64, which MPS does not have. Valid on 'mps': "
            f"{choices(n for n in PRECISIONS.names() if n != '64-true')}."
        )
    return precision


def _is_available(name: str) -> bool:
    check: Callable[[], object] | None = getattr(ACCELERATORS.factory(name), "is_available", None)
    return bool(check()) if callable(check) else True


def _unavailable(arg: object) -> ConfigurationError:
    available = [name for name in ACCELERATORS.names() if _is_available(name)]
    what = f"accelerator={arg!r}" if isinstance(arg, str) else f"the accelerator {arg!r}"
    return ConfigurationError(f"{what} is not available on this machine. Available: {choices(['auto', *available])}.")


def _is_single_process(name: str) -> bool:
    if name == "auto":
        return False
    factory = STRATEGIES.factory(name)
    spans = getattr(factory, "drives_all_local_devices", False) is True  # one process, every device (XLA SPMD)
    return isinstance(factory, type) and not issubclass(factory, ParallelStrategy) and not spans


def _accepts(factory: Callable[..., Any], parameter: str) -> bool:
    """Whether ``factory`` takes ``parameter`` by name (``**kwargs`` does not count: it may go elsewhere)."""
    try:
        found = inspect.signature(factory).parameters.get(parameter)
    except (TypeError, ValueError):
        return False
    return found is not None and found.kind in (found.POSITIONAL_OR_KEYWORD, found.KEYWORD_ONLY)


def _device_type(accelerator: Accelerator) -> str | None:
    name = getattr(accelerator, "name", None)
    return _DEVICE_TYPE_OF.get(name, name) if isinstance(name, str) else None


def _keys(devices: Sequence[torch.device]) -> list[tuple[str, int]]:
    return [(device.type, device.index or 0) for device in devices]  # "cpu" and "cpu:0" are one device
