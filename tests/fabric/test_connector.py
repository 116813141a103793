"""FabricConnector: the CLI's TORCHLOOM_* variables override the code's arguments; resolution is core's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.errors import ConfigurationError
from torchloom.core.precision.amp import MixedPrecision
from torchloom.core.strategies.ddp import DDPStrategy
from torchloom.core.strategies.single_device import SingleDeviceStrategy
from torchloom.core.utils import rank_zero
from torchloom.fabric import connector as connector_module
from torchloom.fabric.connector import CLI_USED_ENV, ENV_VARS, FabricConnector


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in [CLI_USED_ENV, *ENV_VARS.values(), "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"]:
        monkeypatch.delenv(name, raising=False)
    connector_module._reported.clear()
    rank = rank_zero.global_rank()
    rank_zero.set_global_rank(0)
    yield
    rank_zero.set_global_rank(rank)
    connector_module._reported.clear()


def _set_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_without_variables_it_resolves_like_core(capsys: pytest.CaptureFixture[str]) -> None:
    connector = FabricConnector(accelerator="cpu", devices=2, precision="bf16-mixed")
    setup = connector.resolve()
    assert not connector.cli_used
    assert connector.env_overrides == {}
    assert setup.num_devices == 2
    assert isinstance(setup.strategy, DDPStrategy)
    assert setup.precision.name == "bf16-mixed"
    assert capsys.readouterr().out == ""


# (variables, code arguments, expected (accelerator, devices, strategy type, precision, nodes), printed line or "")
OVERRIDES: list[tuple[dict[str, str], dict[str, Any], tuple[str, int, type, str, int], str]] = [
    (
        {"TORCHLOOM_PRECISION": "bf16-mixed"},
        {"accelerator": "cpu"},
        ("cpu", 1, SingleDeviceStrategy, "bf16-mixed", 1),
        "",  # the code kept the default: nothing to report
    ),
    (
        {"TORCHLOOM_PRECISION": "bf16-mixed"},
        {"accelerator": "cpu", "precision": "32-true"},
        ("cpu", 1, SingleDeviceStrategy, "bf16-mixed", 1),
        "torchloom: Fabric(precision='32-true') in the code, --precision bf16-mixed from the CLI: using 'bf16-mixed'",
    ),
    (
        {"TORCHLOOM_PRECISION": "16-mixed"},
        {"accelerator": "cpu", "precision": 16},  # the legacy spelling of the same precision
        ("cpu", 1, SingleDeviceStrategy, "16-mixed", 1),
        "",
    ),
    (
        {"TORCHLOOM_DEVICES": "2"},
        {"accelerator": "cpu"},
        ("cpu", 2, DDPStrategy, "32-true", 1),
        "",
    ),
    (
        {"TORCHLOOM_DEVICES": "2"},
        {"accelerator": "cpu", "devices": 3},
        ("cpu", 2, DDPStrategy, "32-true", 1),
        "torchloom: Fabric(devices=3) in the code, --devices 2 from the CLI: using 2",
    ),
    (
        {"TORCHLOOM_DEVICES": "2"},
        {"accelerator": "cpu", "devices": "2"},
        ("cpu", 2, DDPStrategy, "32-true", 1),
        "",
    ),
    (
        {"TORCHLOOM_ACCELERATOR": "cpu"},
        {"accelerator": "cuda"},  # unavailable here: the CLI's value is the one resolved
        ("cpu", 1, SingleDeviceStrategy, "32-true", 1),
        "torchloom: Fabric(accelerator='cuda') in the code, --accelerator cpu from the CLI: using 'cpu'",
    ),
    (
        {"TORCHLOOM_STRATEGY": "ddp"},
        {"accelerator": "cpu", "strategy": "single_device"},
        ("cpu", 1, DDPStrategy, "32-true", 1),
        "torchloom: Fabric(strategy='single_device') in the code, --strategy ddp from the CLI: using 'ddp'",
    ),
    (
        {"TORCHLOOM_NUM_NODES": "2", "TORCHLOOM_DEVICES": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"},
        {"accelerator": "cpu", "num_nodes": 1},
        ("cpu", 1, DDPStrategy, "32-true", 2),
        "",
    ),
    (
        {"TORCHLOOM_NUM_NODES": "1", "TORCHLOOM_DEVICES": "-1", "TORCHLOOM_ACCELERATOR": "CPU"},
        {"accelerator": "cpu", "num_nodes": 4, "devices": "-1"},
        ("cpu", 1, SingleDeviceStrategy, "32-true", 1),
        "torchloom: Fabric(num_nodes=4) in the code, --num-nodes 1 from the CLI: using 1",
    ),
]


@pytest.mark.parametrize(("env", "code", "expected", "line"), OVERRIDES)
def test_variables_win_over_the_code(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    code: dict[str, Any],
    expected: tuple[str, int, type, str, int],
    line: str,
) -> None:
    _set_env(monkeypatch, {CLI_USED_ENV: "1", **env})
    connector = FabricConnector(**code)
    setup = connector.resolve()
    accelerator, num_devices, strategy_type, precision, num_nodes = expected
    assert connector.cli_used
    assert setup.accelerator.name == accelerator
    assert setup.num_devices == num_devices
    assert type(setup.strategy) is strategy_type
    assert setup.precision.name == precision
    assert setup.num_nodes == num_nodes
    assert set(connector.env_overrides) == {arg for arg, name in ENV_VARS.items() if name in env}
    assert capsys.readouterr().out == (line + "\n" if line else "")


def test_an_instance_naming_the_same_thing_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_env(monkeypatch, {CLI_USED_ENV: "1", "TORCHLOOM_ACCELERATOR": "cpu", "TORCHLOOM_PRECISION": "bf16"})
    accelerator, precision = CPUAccelerator(), MixedPrecision("bf16-mixed", device_type="cpu")
    setup = FabricConnector(accelerator=accelerator, precision=precision).resolve()
    assert setup.accelerator is accelerator
    assert setup.precision is precision


def test_outside_the_cli_the_message_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCHLOOM_PRECISION", "bf16-mixed")
    connector = FabricConnector(accelerator="cpu", precision="64-true")
    assert not connector.cli_used
    assert connector.resolve().precision.name == "bf16-mixed"
    assert capsys.readouterr().out == (
        "torchloom: Fabric(precision='64-true') in the code, TORCHLOOM_PRECISION=bf16-mixed from the environment: "
        "using 'bf16-mixed'\n"
    )


def test_a_conflict_is_printed_once_per_process_and_on_rank_zero_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _set_env(monkeypatch, {CLI_USED_ENV: "1", "TORCHLOOM_DEVICES": "2", "TORCHLOOM_PRECISION": "bf16-mixed"})
    for _ in range(3):
        FabricConnector(accelerator="cpu", devices=4, precision="16-mixed")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2  # one per argument, not one per Fabric
    assert "Fabric(devices=4)" in lines[0]
    assert "Fabric(precision='16-mixed')" in lines[1]

    connector_module._reported.clear()
    rank_zero.set_global_rank(1)
    FabricConnector(accelerator="cpu", devices=4, precision="16-mixed")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("name", "value", "valid"),
    [
        ("TORCHLOOM_ACCELERATOR", "cpx", "'cpu'"),
        ("TORCHLOOM_STRATEGY", "dpp", "'ddp'"),
        ("TORCHLOOM_DEVICES", "two", "'0,2'"),
        ("TORCHLOOM_DEVICES", "0", "count n >= 1"),
        ("TORCHLOOM_NUM_NODES", "0", "positive int"),
        ("TORCHLOOM_NUM_NODES", "two", "positive int"),
        ("TORCHLOOM_PRECISION", "bf17", "'bf16-mixed'"),
    ],
)
def test_an_invalid_variable_names_itself_its_value_and_the_valid_ones(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, valid: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as error:
        FabricConnector()
    assert f"{name}={value!r}" in str(error.value)
    assert valid in str(error.value)


def test_a_resolution_error_says_which_values_came_from_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_env(monkeypatch, {CLI_USED_ENV: "1", "TORCHLOOM_DEVICES": "0,1"})
    with pytest.raises(ConfigurationError) as error:
        FabricConnector(accelerator="cpu").resolve()
    message = str(error.value)
    assert "devices=[0, 1] is not valid for the 'cpu' accelerator" in message  # core's own message
    assert "set by `torchloom run`" in message
    assert "TORCHLOOM_DEVICES='0,1'" in message


def test_under_the_cli_a_strategy_that_starts_its_own_workers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(
        FabricConnector(accelerator="cpu", strategy="ddp_spawn", devices=2).resolve().strategy, DDPStrategy
    )
    monkeypatch.setenv(CLI_USED_ENV, "1")
    with pytest.raises(ConfigurationError, match="started by `torchloom run`") as error:
        FabricConnector(accelerator="cpu", strategy="ddp_spawn", devices=2).resolve()
    assert "'ddp'" in str(error.value)
    assert FabricConnector(accelerator="cpu", strategy="ddp", devices=2).resolve().strategy.launcher is not None


def test_gpu_indices_from_the_cli_reach_the_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    _set_env(monkeypatch, {CLI_USED_ENV: "1", "TORCHLOOM_ACCELERATOR": "cuda", "TORCHLOOM_DEVICES": "0,2"})
    setup = FabricConnector(accelerator="cpu", devices=1).resolve()
    assert setup.devices == [torch.device("cuda", 0), torch.device("cuda", 2)]
    assert isinstance(setup.strategy, DDPStrategy)
