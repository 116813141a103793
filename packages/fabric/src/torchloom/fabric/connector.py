"""FabricConnector: core's Connector plus one product rule, the ``torchloom run`` CLI's overrides.

The CLI exports its options as environment variables before it starts the workers, and they win over
the values written in the code:

=========================  ==================  ===============================================
variable                   Fabric argument     spellings
=========================  ==================  ===============================================
``TORCHLOOM_ACCELERATOR``  ``accelerator``     ``auto``, ``gpu`` or a registered accelerator name
``TORCHLOOM_STRATEGY``     ``strategy``        ``auto`` or a registered strategy name
``TORCHLOOM_DEVICES``      ``devices``         ``auto``, ``-1``, a count ``n``, or indices ``0,2``
``TORCHLOOM_NUM_NODES``    ``num_nodes``       a positive int
``TORCHLOOM_PRECISION``    ``precision``       a registered precision or a legacy spelling (``bf16``)
=========================  ==================  ===============================================

``TORCHLOOM_CLI_USED=1`` says the CLI started this process. Where the code passes a value that is not
the default and differs from the override, global rank 0 prints once which value was taken. Under
the CLI the processes exist already, so a strategy that would start its own (spawn, fork, XLA) is
refused. Everything else (resolving ``"auto"``, checking combinations) is core's ``Connector``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from typing_extensions import override

from torchloom.core.accelerators.accelerator import Accelerator, DeviceSpec, normalize_device_spec
from torchloom.core.connector import Connector, PluginArg, Setup
from torchloom.core.connector_rules import precision_name
from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.precision.precision import Precision
from torchloom.core.registry import ACCELERATORS, PRECISIONS, STRATEGIES
from torchloom.core.strategies.strategy import Strategy
from torchloom.core.utils.rank_zero import rank_zero_info

__all__ = ["CLI_USED_ENV", "ENV_VARS", "FabricConnector"]

T = TypeVar("T")

CLI_USED_ENV = "TORCHLOOM_CLI_USED"
# Fabric argument -> the environment variable through which the CLI overrides it
ENV_VARS: dict[str, str] = {
    "accelerator": "TORCHLOOM_ACCELERATOR",
    "strategy": "TORCHLOOM_STRATEGY",
    "devices": "TORCHLOOM_DEVICES",
    "num_nodes": "TORCHLOOM_NUM_NODES",
    "precision": "TORCHLOOM_PRECISION",
}
DEVICE_FORMS = "'auto', -1 (all), a device count n >= 1 such as 2, or device indices such as '0,2' or '1,'"

_reported: set[str] = set()  # conflict lines already printed by this process


class FabricConnector(Connector):
    """``Connector`` whose arguments are first overridden by the ``TORCHLOOM_*`` variables of the CLI."""

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
        self.cli_used = os.environ.get(CLI_USED_ENV) == "1"
        self.env_overrides: dict[str, str] = {}  # argument -> the raw value its variable held
        super().__init__(
            accelerator=self._take("accelerator", accelerator, "auto", _parse_accelerator, _same_accelerator),
            strategy=self._take("strategy", strategy, "auto", _parse_strategy, _same_strategy),
            devices=self._take("devices", devices, "auto", _parse_devices, _same_devices),
            num_nodes=self._take("num_nodes", num_nodes, 1, _parse_num_nodes, _same_num_nodes),
            precision=self._take("precision", precision, None, _parse_precision, _same_precision),
            plugins=plugins,
        )

    @override
    def resolve(self) -> Setup:
        try:
            setup = super().resolve()
        except ConfigurationError as error:
            if not self.env_overrides:
                raise
            taken = ", ".join(f"{ENV_VARS[arg]}={raw!r}" for arg, raw in self.env_overrides.items())
            raise ConfigurationError(
                f"{error}\nThese values came from the environment ({self._source}): {taken}."
            ) from error
        if self.cli_used:
            _check_launcher_fits_cli(setup)
        return setup

    @property
    def _source(self) -> str:
        return "set by `torchloom run`" if self.cli_used else "TORCHLOOM_* variables"

    def _take(
        self,
        argument: str,
        code_value: T,
        default: object,
        parse: Callable[[str, str], T],
        same: Callable[[T, T], bool],
    ) -> T:
        """The environment's value for ``argument`` if its variable is set (reporting a conflict), else the code's."""
        variable = ENV_VARS[argument]
        raw = os.environ.get(variable, "").strip()
        if not raw:
            return code_value
        env_value = parse(variable, raw)
        self.env_overrides[argument] = raw
        if same(code_value, env_value):
            return code_value  # keeps an instance the code passed when it names the same thing
        if not _is_default(code_value, default):
            flag = f"--{argument.replace('_', '-')} {raw}" if self.cli_used else f"{variable}={raw}"
            where = "from the CLI" if self.cli_used else "from the environment"
            _report(f"torchloom: Fabric({argument}={code_value!r}) in the code, {flag} {where}: using {env_value!r}")
        return env_value


def _report(line: str) -> None:
    if line not in _reported:
        _reported.add(line)
        rank_zero_info(line)


def _is_default(value: object, default: object) -> bool:
    if isinstance(value, str) and isinstance(default, str):
        return value.strip().lower() == default
    return value is default or (type(value) is type(default) and value == default)


def _check_launcher_fits_cli(setup: Setup) -> None:
    launcher = setup.launcher
    if launcher is None or launcher.reruns_script:
        return  # the script launcher sees it is a worker already and runs in-process
    raise ConfigurationError(
        f"This process was started by `torchloom run`, which starts one process per device itself, but the "
        f"strategy {setup.strategy!r} would start its own workers with {type(launcher).__name__}. Valid under "
        f"the CLI: a script-launched strategy such as {choices(['auto', 'ddp'])} (pass --strategy to the CLI or "
        "change the code), or run the script with plain `python` to let this strategy start its workers."
    )


# --------------------------------------------------------------- parsing the variables


def _parse_accelerator(variable: str, raw: str) -> str:
    valid = ["auto", "gpu", *ACCELERATORS.names()]
    if raw.lower() not in valid:
        raise ConfigurationError(f"{variable}={raw!r} is not a valid accelerator. Valid: {choices(valid)}.")
    return raw.lower()


def _parse_strategy(variable: str, raw: str) -> str:
    if raw.lower() != "auto" and raw not in STRATEGIES:
        valid = ["auto", *STRATEGIES.names()]
        raise ConfigurationError(f"{variable}={raw!r} is not a valid strategy. Valid: {choices(valid)}.")
    return raw.lower()


def _parse_devices(variable: str, raw: str) -> DeviceSpec:
    try:
        spec = normalize_device_spec(raw, "any", DEVICE_FORMS)
    except ConfigurationError:
        spec = 0  # reported below with the variable's name
    if isinstance(spec, int) and spec < 1 and spec != -1:
        raise ConfigurationError(f"{variable}={raw!r} is not a valid device spec. Valid: {DEVICE_FORMS}.")
    return spec


def _parse_num_nodes(variable: str, raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigurationError(f"{variable}={raw!r} is not a valid node count. Valid: a positive int such as 1 or 2.")
    return int(raw)


def _parse_precision(variable: str, raw: str) -> str:
    try:
        return precision_name(raw)
    except ConfigurationError:
        legacy = choices(["64", "32", "16", "bf16"])
        raise ConfigurationError(
            f"{variable}={raw!r} is not a valid precision. Valid: {choices(PRECISIONS.names())}, or the legacy "
            f"spellings {legacy}."
        ) from None


# --------------------------------------------------------------- does the code already say the same?


def _same_accelerator(code: str | Accelerator, env: str | Accelerator) -> bool:
    name = code.lower() if isinstance(code, str) else getattr(code, "name", None)
    return name == env


def _same_strategy(code: str | Strategy, env: str | Strategy) -> bool:
    return isinstance(code, str) and code.lower() == env


def _same_devices(code: DeviceSpec, env: DeviceSpec) -> bool:
    try:
        return normalize_device_spec(code, "any", DEVICE_FORMS) == env
    except ConfigurationError:
        return False  # the code's value is invalid anyway; the environment's replaces it


def _same_num_nodes(code: int, env: int) -> bool:
    return code == env


def _same_precision(code: str | int | Precision | None, env: str | int | Precision | None) -> bool:
    if isinstance(code, Precision):
        return code.name == env
    try:
        return precision_name("32-true" if code is None else code) == env
    except ConfigurationError:
        return False
