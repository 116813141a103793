"""Bad constructor arguments (issue 8, fault tolerance): random values and combinations for every strategy,
the connector, Fabric, Trainer and the ``torchloom`` CLI.

The property everywhere: either the arguments are valid (construction / ``resolve()`` succeeds, and
starts no process and no process group), or a ``ConfigurationError`` (or a documented subclass such as
``MissingDependencyError``) is raised whose message names the argument or shows the bad value. Never
another exception type, never a hang (each call runs under an alarm). The CLI either plans a run (the
launch itself is replaced), or exits with status 2 and a message; ``--help``/``--version`` exit 0.

Below the properties: one focused regression test per bug these draws found.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import io
import logging
import math
import multiprocessing
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.checkpoint.io import TorchCheckpointIO
from torchloom.core.connector import Connector
from torchloom.core.environments.local import LocalEnvironment
from torchloom.core.errors import ConfigurationError
from torchloom.core.loggers.csv import CSVLogger
from torchloom.core.precision.amp import MixedPrecision
from torchloom.core.precision.half import HalfPrecision
from torchloom.core.precision.precision import Precision
from torchloom.core.registry import ACCELERATORS, PRECISIONS, STRATEGIES
from torchloom.core.strategies.ddp import DDPStrategy
from torchloom.core.strategies.deepspeed import DeepSpeedStrategy
from torchloom.core.strategies.fsdp import FSDPStrategy
from torchloom.core.strategies.model_parallel import ModelParallelStrategy
from torchloom.core.strategies.single_device import SingleDeviceStrategy
from torchloom.core.strategies.strategy import Strategy
from torchloom.fabric import Fabric, cli
from torchloom.fabric.connector import CLI_USED_ENV, ENV_VARS
from torchloom.trainer import Trainer
from torchloom.trainer.callbacks.callback import Callback

HANG_S = 20  # one construction or resolve; a healthy one takes milliseconds
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STRATEGY_CLASSES = (DDPStrategy, FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy, SingleDeviceStrategy)
_ROOT = tempfile.mkdtemp(prefix="torchloom-faults-")  # default_root_dir / scripts; nothing is written there


class Opaque:
    """An object of no type torchloom knows."""

    def __repr__(self) -> str:
        return "<Opaque>"


# ---------------------------------------------------------------- value strategies

_EDGE_INTS = [-(2**70), -(2**31), -2, -1, 0, 1, 2, 3, 4096, 4097, 2**31, 2**63, 10**9, 2**70]
_TEXTS = [
    "",
    " ",
    "auto",
    "AUTO",
    "cpu",
    "gpu",
    "cuda",
    "mps",
    "tpu",
    "ddp",
    "fsdp",
    "-1",
    "0",
    "2",
    "0,1",
    "1,",
    ",",
    "16",
    "32",
    "bf16",
    "64",
    "32-true",
    "16-mixed",
    "bf16-mixed",
    "none",
    "\x00",
    "ddp_spawn",
    "norm",
    "value",
    "FULL_SHARD",
    "popen",
    "spawn",
    "fork",
    "thread",
    "gloo",
    "00:00:00:01",
    "1:2",
    "sharded",
    "full",
]
_DELTAS = [datetime.timedelta(0), datetime.timedelta(seconds=-1), datetime.timedelta(seconds=5), datetime.timedelta.max]

bad_values = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(_EDGE_INTS),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.5, math.nan, math.inf, -math.inf]),
    st.sampled_from(_TEXTS),
    st.text(max_size=8),
    st.lists(st.integers(-2, 4), max_size=3),
    st.tuples(st.integers(-1, 3), st.integers(-1, 3)),
    st.dictionaries(st.sampled_from(["a", "days", "stage", "seconds"]), st.integers(-3, 3), max_size=2),
    st.builds(Opaque),
    st.sampled_from(_DELTAS),
    st.sampled_from([torch.device("cpu"), [torch.device("cpu")] * 2, torch.float16]),
)


def _accelerators() -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(["auto", "cpu", "CPU", "gpu", "cuda", "mps", "tpu"]), st.builds(CPUAccelerator))


def _strategies() -> st.SearchStrategy[Any]:
    return st.sampled_from(["auto", "AUTO", *STRATEGIES.names()])


def _devices() -> st.SearchStrategy[Any]:
    return st.sampled_from(["auto", 1, 2, -1, "1", "2", "-1", 0, [0], "0,1", 4096, 4097, 10**9])


def _precisions() -> st.SearchStrategy[Any]:
    legacy = [None, 16, 32, 64, "16", "32", "64", "bf16"]
    built = st.sampled_from(["16-mixed", "bf16-mixed"]).map(MixedPrecision)  # type: ignore[arg-type]
    return st.one_of(st.sampled_from([*PRECISIONS.names(), *legacy]), built, st.builds(Precision))


def _plugins() -> st.SearchStrategy[Any]:
    one = st.one_of(
        st.builds(LocalEnvironment),
        st.builds(TorchCheckpointIO),
        st.builds(Precision),
        st.builds(HalfPrecision, st.just("bf16-true")),
    )
    return st.one_of(st.none(), one, st.lists(one, max_size=3), st.lists(one, max_size=2).map(tuple))


def _mostly(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Plausible values three times in four, else a bad value of any type (so that valid combinations occur)."""
    return st.one_of(plausible, plausible, plausible, bad_values)


def hardware_arguments() -> st.SearchStrategy[dict[str, Any]]:
    """accelerator/strategy/devices/num_nodes/precision/plugins: plausible values mixed with bad ones."""
    fields = {
        "accelerator": _mostly(_accelerators()),
        "strategy": _mostly(_strategies()),
        "devices": _mostly(_devices()),
        "num_nodes": _mostly(st.sampled_from([1, 2, 3])),
        "precision": _mostly(_precisions()),
        "plugins": _mostly(_plugins()),
    }
    return st.fixed_dictionaries({}, optional=fields)


# ---------------------------------------------------------------- the property


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: int) -> Iterator[None]:
    def fire(signum: int, frame: object) -> None:
        raise _Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _no_cli_environment() -> Iterator[None]:
    """Without TORCHLOOM_* variables (FabricConnector would take them over the arguments); restored after."""
    names = [CLI_USED_ENV, *ENV_VARS.values()]
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _torch_flags_restored() -> Iterator[None]:
    """Trainer(deterministic=/benchmark=) sets torch's global switches; other tests must not see them."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    try:
        yield
    finally:
        if (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ) != saved[:2]:
            torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]


def _mentions(message: str, arguments: dict[str, Any]) -> bool:
    """The message names one of the arguments, or shows one of the values (repr or str)."""
    for name, value in arguments.items():
        shown = {name, name.replace("_", "-"), repr(value)}
        if isinstance(value, str):
            shown.add(value.strip().lower())
        if any(s and s in message for s in shown):
            return True
    return False


def valid_or_configuration_error(build: Callable[[], Any], arguments: dict[str, Any], where: str) -> Any:
    """Runs ``build``; returns its result, or ``None`` after a ``ConfigurationError`` that names an argument."""
    children_before = set(multiprocessing.active_children())
    try:
        with _alarm(HANG_S):
            result = build()
    except ConfigurationError as error:  # MissingDependencyError is not one: deepspeed is installed here
        message = str(error)
        assert _mentions(message, arguments), f"{where}({arguments!r}): the message names no argument: {message}"
        event(f"{where}: ConfigurationError")
        return None
    except _Hang:
        pytest.fail(f"{where}({arguments!r}) did not return within {HANG_S} s")
    except Exception as error:  # the property under test: nothing else may escape
        pytest.fail(f"{where}({arguments!r}) raised {type(error).__name__}: {error}")
    assert set(multiprocessing.active_children()) == children_before, f"{where}({arguments!r}) started processes"
    assert not dist.is_initialized(), f"{where}({arguments!r}) created a process group"
    event(f"{where}: valid")
    return result


# ---------------------------------------------------------------- strategies


def _parameters(cls: type) -> list[str]:
    return [name for name, p in inspect.signature(cls).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]


def strategy_kwargs(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    """1-3 of ``cls``'s arguments with bad values; for a class that takes ``**kwargs``, maybe an extra keyword
    (a class without it raises Python's own TypeError for an unknown keyword, which is not drawn)."""
    names = _parameters(cls)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls).parameters.values())
    extra = (
        st.just({})
        if not takes_any
        else st.dictionaries(
            st.sampled_from(["static_graph", "bogus", "find_unused_parameters", "device_ids", "mesh"]),
            bad_values,
            max_size=1,
        )
    )
    picked = st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)
    return picked.flatmap(lambda chosen: st.fixed_dictionaries(dict.fromkeys(chosen, bad_values))).flatmap(
        lambda kwargs: extra.map(lambda more: {**more, **kwargs})
    )


def _resolve_with(strategy: Strategy, devices: Any) -> Any:
    return Connector(accelerator="auto", strategy=strategy, devices=devices).resolve()


@pytest.mark.parametrize("cls", STRATEGY_CLASSES, ids=lambda c: c.__name__)
@FAST
@given(data=st.data())
def test_strategy_constructor_arguments(cls: type[Strategy], data: st.DataObject) -> None:
    kwargs = data.draw(strategy_kwargs(cls), label="kwargs")
    strategy = valid_or_configuration_error(lambda: cls(**kwargs), kwargs, cls.__name__)
    if strategy is None:
        return
    devices = data.draw(st.sampled_from(["auto", 1, 2]), label="devices")
    # what the strategy carries must not break the connector either
    valid_or_configuration_error(lambda: _resolve_with(strategy, devices), {**kwargs, "devices": devices}, "resolve")


@pytest.mark.parametrize("name", STRATEGIES.names())
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_registered_strategy_names_with_bad_arguments(name: str, data: st.DataObject) -> None:
    """``STRATEGIES.get(name, **kwargs)``: a preset's arguments overridden by bad values."""
    cls = STRATEGIES.factory(name)
    kwargs = data.draw(strategy_kwargs(cls), label="kwargs")
    valid_or_configuration_error(lambda: STRATEGIES.get(name, **kwargs), kwargs, f"STRATEGIES.get({name!r})")


# ---------------------------------------------------------------- connector, Fabric, Trainer


@settings(max_examples=200, deadline=None)
@given(arguments=hardware_arguments())
def test_connector_arguments(arguments: dict[str, Any]) -> None:
    setup = valid_or_configuration_error(lambda: Connector(**arguments).resolve(), arguments, "Connector")
    if setup is not None:
        assert setup.num_devices >= 1 and setup.strategy.precision is setup.precision


@settings(max_examples=100, deadline=None)
@given(
    arguments=st.fixed_dictionaries(
        {},
        optional={
            "accelerator": _accelerators(),
            "strategy": _strategies(),
            "devices": _devices(),
            "num_nodes": st.sampled_from([1, 2]),
            "precision": _precisions(),
        },
    )
)
def test_connector_plausible_arguments(arguments: dict[str, Any]) -> None:
    """Only plausible values, so that most combinations resolve (the wiring and auto choices run)."""
    setup = valid_or_configuration_error(lambda: Connector(**arguments).resolve(), arguments, "Connector")
    if setup is not None:
        assert setup.strategy.accelerator is setup.accelerator


@settings(max_examples=120, deadline=None)
@given(
    arguments=hardware_arguments(),
    extra=st.fixed_dictionaries(
        {},
        optional={
            "callbacks": st.one_of(st.none(), st.lists(st.builds(Opaque), max_size=2), bad_values),
            "loggers": st.one_of(
                st.none(), st.just(CSVLogger(_ROOT)), st.lists(st.just(CSVLogger(_ROOT)), max_size=2), bad_values
            ),
        },
    ),
)
def test_fabric_arguments(arguments: dict[str, Any], extra: dict[str, Any]) -> None:
    arguments = {**arguments, **extra}
    with _no_cli_environment():
        valid_or_configuration_error(lambda: Fabric(**arguments), arguments, "Fabric")


_LOOP_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "max_epochs": st.sampled_from([None, -1, 0, 1, 5]),
    "min_epochs": st.sampled_from([None, 0, 1, 10]),
    "max_steps": st.sampled_from([-1, 0, 1, 100]),
    "min_steps": st.sampled_from([None, 0, 5, 1000]),
    "max_time": st.one_of(
        st.sampled_from([None, "00:00:01:00", "99999999999:00:00:00", "1:2:3", datetime.timedelta(hours=1)]),
        st.dictionaries(
            st.sampled_from(["days", "hours", "minutes", "seconds"]), st.floats(allow_nan=True), max_size=2
        ),
    ),
    "limit_train_batches": st.sampled_from([None, 0, 1, 0.5, 1.0, 2]),
    "limit_val_batches": st.sampled_from([None, 0, 0.0, 0.25]),
    "limit_test_batches": st.sampled_from([None, 1, 0.1]),
    "limit_predict_batches": st.sampled_from([None, 3, 1.0]),
    "val_check_interval": st.sampled_from([None, 1, 0.5, 1.0, 100]),
    "check_val_every_n_epoch": st.sampled_from([None, 1, 2]),
    "num_sanity_val_steps": st.sampled_from([None, -1, 0, 2]),
    "log_every_n_steps": st.sampled_from([None, 1, 50]),
    "accumulate_grad_batches": st.sampled_from([1, 2, 8]),
    "gradient_clip_val": st.sampled_from([None, 0, 0.5, 1, math.inf]),
    "gradient_clip_algorithm": st.sampled_from([None, "norm", "value", "VALUE"]),
    "deterministic": st.sampled_from([None, True, False, "warn"]),
    "benchmark": st.sampled_from([None, True, False]),
    "enable_checkpointing": st.sampled_from([None, True, False]),
    "enable_progress_bar": st.sampled_from([None, True, False]),
    "enable_model_summary": st.sampled_from([None, True, False]),
    "fast_dev_run": st.sampled_from([False, True, 0, 3]),
    "default_root_dir": st.sampled_from([None, _ROOT, Path(_ROOT)]),
    "use_distributed_sampler": st.booleans(),
    "sync_batchnorm": st.booleans(),
    "reload_dataloaders_every_n_epochs": st.sampled_from([0, 1, 3]),
    "inference_mode": st.booleans(),
    "detect_anomaly": st.booleans(),
    "barebones": st.booleans(),
    "logger": st.sampled_from([False, None, True, CSVLogger(_ROOT), [CSVLogger(_ROOT)]]),
    "callbacks": st.sampled_from([None, [], Callback(), [Callback(), Callback()]]),
}


def trainer_arguments() -> st.SearchStrategy[dict[str, Any]]:
    """Each loop argument: plausible values, or a bad value of any type (one in four)."""
    optional = {name: _mostly(values) for name, values in _LOOP_VALUES.items()}
    return st.fixed_dictionaries({}, optional=optional)


@settings(max_examples=150, deadline=None)
@given(loop=trainer_arguments(), hardware=hardware_arguments())
def test_trainer_arguments(loop: dict[str, Any], hardware: dict[str, Any]) -> None:
    arguments = {**hardware, **loop}
    with _torch_flags_restored():
        trainer = valid_or_configuration_error(lambda: Trainer(**arguments), arguments, "Trainer")
    if trainer is not None:
        config = trainer.config
        assert config.max_epochs >= -1 and config.accumulate_grad_batches >= 1
        assert config.gradient_clip_val is None or config.gradient_clip_val > 0


# ---------------------------------------------------------------- the CLI


_RUN_OPTIONS: dict[str, st.SearchStrategy[str]] = {
    "--accelerator": st.sampled_from(["auto", "cpu", "gpu", "cuda", "tpu", "CPU", "", "bogus"]),
    "--strategy": st.sampled_from(["auto", "ddp", "ddp_spawn", "ddp_notebook", "fsdp", "deepspeed", "", "DDP", "x"]),
    "--devices": st.sampled_from(
        ["auto", "1", "2", "-1", "0", "0,1", "1,", "", "abc", "4097", "1000000000", str(2**70)]
    ),
    "--num-nodes": st.sampled_from(["1", "2", "0", "-1", "abc", "1.5", "1000000000", str(2**70)]),
    "--node-rank": st.sampled_from(["0", "1", "-1", "abc", "999999999999"]),
    "--main-address": st.sampled_from(["127.0.0.1", "", "node-0"]),
    "--main-port": st.sampled_from(["0", "1", "29500", "65535", "65536", "-1", "abc", str(2**70)]),
    "--precision": st.sampled_from(["32", "bf16", "16-mixed", "32-true", "", "bogus", "8"]),
}


def run_argv() -> st.SearchStrategy[list[str]]:
    option = st.sampled_from(sorted(_RUN_OPTIONS)).flatmap(
        lambda flag: _RUN_OPTIONS[flag].map(lambda value: [flag, value])
    )
    script = st.sampled_from([os.path.join(_ROOT, "train.py"), os.path.join(_ROOT, "missing.py"), _ROOT, ""])
    tail = st.lists(st.sampled_from(["--lr", "0.1", "--devices", "x", "-h"]), max_size=3)
    noise = st.lists(st.sampled_from(["--help", "--version", "--bogus", "-x", "--devices"]), max_size=1)
    return st.tuples(st.lists(option, max_size=5), noise, script, tail).map(
        lambda parts: ["run", *[token for pair in parts[0] for token in pair], *parts[1], parts[2], *parts[3]]
    )


def consolidate_argv() -> st.SearchStrategy[list[str]]:
    path = st.sampled_from([_ROOT, os.path.join(_ROOT, "missing"), os.path.join(_ROOT, "train.py"), "", "\x00", "."])
    out = st.sampled_from([os.path.join(_ROOT, "out.pt"), _ROOT, "", os.path.join(_ROOT, "missing", "out.pt")])
    flags = st.lists(st.sampled_from(["--overwrite", "--bogus"]), max_size=1)
    return st.tuples(path, out, flags).map(lambda parts: ["consolidate", parts[0], parts[1], *parts[2]])


def _run_cli(argv: list[str], launched: list[cli.RunPlan]) -> tuple[int, str]:
    """``cli.main(argv)`` with the launch replaced: its exit status and what it printed to stderr."""
    stderr, stdout = io.StringIO(), io.StringIO()
    try:
        with (
            _alarm(HANG_S),
            contextlib.redirect_stderr(stderr),
            contextlib.redirect_stdout(stdout),
            _no_cli_environment(),
        ):
            original = cli.launch
            cli.launch = lambda plan: launched.append(plan) or 0  # type: ignore[assignment]
            try:
                status = cli.main(argv)
            finally:
                cli.launch = original  # type: ignore[assignment]
    except SystemExit as exit:  # argparse: usage errors (2), --help / --version (0)
        status = exit.code if isinstance(exit.code, int) else 2
    except _Hang:
        pytest.fail(f"torchloom {argv!r} did not return within {HANG_S} s")
    except Exception as error:
        pytest.fail(f"torchloom {argv!r} raised {type(error).__name__}: {error}")
    return status, stderr.getvalue()


@pytest.fixture(scope="module", autouse=True)
def _script() -> None:
    Path(_ROOT, "train.py").write_text("raise SystemExit('the property tests never run this script')\n")


@settings(max_examples=120, deadline=None)
@given(argv=st.one_of(run_argv(), consolidate_argv()))
def test_cli_arguments(argv: list[str]) -> None:
    launched: list[cli.RunPlan] = []
    status, stderr = _run_cli(argv, launched)
    if status == 0:  # a planned run (its script exists), or --help / --version
        assert launched or any(token in ("--help", "-h", "--version") for token in argv), argv
        for plan in launched:
            assert plan.nproc_per_node >= 1 and any(os.path.isfile(arg) for arg in plan.torchrun_args), plan
        return
    assert status == 2, f"torchloom {argv!r} exited with {status}"
    assert "error" in stderr and "Traceback" not in stderr, stderr
    assert not launched


# ---------------------------------------------------------------- regressions: one per bug the draws found


def _raises(match: str, build: Callable[[], Any]) -> str:
    with _alarm(HANG_S), pytest.raises(ConfigurationError, match=match) as caught:
        build()
    return str(caught.value)


@pytest.mark.parametrize("devices", [10**9, 2**31, 2**70, "1000000000", 4097])
def test_huge_cpu_device_count_is_refused_at_once(devices: Any) -> None:
    # before: a list of 10**9 torch.device objects (minutes, gigabytes: a hang), or OverflowError for 2**70
    message = _raises("devices=", lambda: Connector(accelerator="cpu", devices=devices).resolve())
    assert "4096" in message
    assert len(CPUAccelerator.parse_devices(4096)) == 4096  # the largest count still works


def test_cli_node_rank_message_with_huge_num_nodes() -> None:
    # before: the message listed range(num_nodes) item by item, so --num-nodes 1000000000 hung the CLI
    status, stderr = _run_cli(["run", "--num-nodes", "1000000000", "--node-rank", "-1", "x.py"], [])
    assert status == 2 and "--node-rank -1" in stderr and "0 to 999999999" in stderr
    status, stderr = _run_cli(["run", "--num-nodes", "3", "--node-rank", "5", "x.py"], [])
    assert status == 2 and "0, 1, 2" in stderr


@pytest.mark.parametrize("loggers", [5, True, 1.5, "csv", {"a": 1}, Opaque()])
def test_fabric_loggers_that_are_not_loggers(loggers: Any) -> None:
    # before: TypeError ('int' object is not iterable) for non-iterables; a string was split into characters
    with _no_cli_environment():
        _raises(r"loggers=.*Valid", lambda: Fabric(accelerator="cpu", loggers=loggers))


@pytest.mark.parametrize("root", [5, True, [], Opaque(), "", "a\x00b"])
def test_trainer_default_root_dir_type(root: Any) -> None:
    # before: TypeError from os.fspath (5, True, ...); "" and a NUL byte failed only when a logger wrote
    _raises("default_root_dir=", lambda: Trainer(accelerator="cpu", logger=False, default_root_dir=root))
    assert Trainer(accelerator="cpu", logger=False, default_root_dir=Path(_ROOT)).config.default_root_dir == _ROOT


@pytest.mark.parametrize(
    "max_time", [{"days": 1e30}, {"hours": math.nan}, {"seconds": math.inf}, "99999999999:00:00:00"]
)
def test_trainer_max_time_out_of_range(max_time: Any) -> None:
    # before: OverflowError / ValueError from datetime.timedelta
    _raises("max_time=", lambda: Trainer(accelerator="cpu", logger=False, max_time=max_time))


def test_trainer_gradient_clip_val_nan() -> None:
    # before: NaN passed (NaN < 0 is False) and then meant "no clipping" silently
    _raises("gradient_clip_val=nan", lambda: Trainer(accelerator="cpu", logger=False, gradient_clip_val=math.nan))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stage": 2.0}, "stage=2.0"),  # before: AssertionError
        ({"precision": "bf16-mixed"}, "precision='bf16-mixed'"),  # before: AttributeError: no attribute 'name'
        ({"precision": 5}, "precision=5"),
        ({"micro_batch_size": 0}, "micro_batch_size=0"),  # before: 0 (and [], "", False) silently became 1
        ({"micro_batch_size": False}, "micro_batch_size=False"),
        ({"gradient_clipping": math.nan}, "gradient_clipping=nan"),  # before: accepted
        ({"gradient_clipping": math.inf}, "gradient_clipping=inf"),
        ({"logging_level": "loud"}, "logging_level='loud'"),  # before: accepted, failed in the worker
        ({"offload_optimizer": "False"}, "offload_optimizer='False'"),  # before: bool("False") is True
        ({"stage": 3, "zero_init": "no"}, "zero_init='no'"),
    ],
)
def test_deepspeed_constructor_checks(kwargs: dict[str, Any], match: str) -> None:
    message = _raises("not valid", lambda: DeepSpeedStrategy(**kwargs))
    assert match in message
    assert DeepSpeedStrategy(micro_batch_size=None, logging_level=logging.INFO).stage == 2


@pytest.mark.parametrize("device", [1, 0, None, 1.5, "", "auto", "2", "0,1", [0], Opaque(), 2**70])
def test_single_device_strategy_device(device: Any) -> None:
    # before: TypeError / RuntimeError / ValueError from torch.device; an int meant a CUDA device index
    _raises(r"device=.*Valid", lambda: SingleDeviceStrategy(device=device))
    assert SingleDeviceStrategy("cpu").root_device == torch.device("cpu")
    assert SingleDeviceStrategy(torch.device("cpu")).root_device == torch.device("cpu")


@pytest.mark.parametrize(
    "cls", [DDPStrategy, FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy, SingleDeviceStrategy]
)
@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("accelerator", "cpu"),
        ("precision", "32-true"),
        ("checkpoint_io", "io"),
        ("cluster_environment", 1),
        ("parallel_devices", 2),
        ("parallel_devices", []),
        ("parallel_devices", ["cpu"]),
        ("process_group_backend", 5),
        ("process_group_backend", ""),
    ],
)
def test_strategy_wiring_arguments_are_type_checked(cls: type[Strategy], argument: str, value: Any) -> None:
    # before: stored as given; resolve() then failed with AttributeError ('int' object has no attribute 'validate')
    # or TypeError ('int' object is not iterable), or the worker failed at setup
    if argument not in _parameters(cls):
        pytest.skip(f"{cls.__name__} has no {argument}")
    message = _raises("Valid", lambda: cls(**{argument: value}))
    assert f"{argument}={value!r}" in message


def test_ddp_unknown_keyword_arguments() -> None:
    # before: accepted; DistributedDataParallel raised TypeError in every worker at setup_module
    message = _raises("unknown arguments", lambda: DDPStrategy(static_grpah=True))
    assert "'static_grpah'" in message and "'static_graph'" in message
    _raises("unknown arguments", lambda: DDPStrategy(device_ids=[0]))  # setup_module sets device_ids itself
    assert DDPStrategy(static_graph=True, find_unused_parameters=False).start_method == "popen"


@pytest.mark.parametrize("dtype", [[], {}, ["16-mixed"]])
def test_precision_dtype_unhashable(dtype: Any) -> None:
    # before: TypeError: unhashable type
    _raises(r"dtype=", lambda: MixedPrecision(dtype))
    _raises(r"dtype=", lambda: HalfPrecision(dtype))


def test_mixed_precision_scaler_type() -> None:
    # before: any object was kept as the scaler and failed at the first backward
    _raises(r"scaler=5", lambda: MixedPrecision("16-mixed", scaler=5))  # type: ignore[arg-type]


def test_registry_names_are_all_covered() -> None:
    """The property tests construct every registered strategy name and every accelerator name."""
    assert {"ddp", "fsdp", "model_parallel", "deepspeed", "single_device"} <= set(STRATEGIES.names())
    assert "cpu" in ACCELERATORS.names()
