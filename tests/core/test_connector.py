"""The Connector: every accepted spelling, every rejection, and random combinations (hypothesis).

Device queries are patched (``set_machine``) so CUDA, MPS and TPU paths run on this CPU machine.
Resolution starts no process and no process group; ``test_resolution_starts_nothing`` checks it.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typing_extensions import override

from torchloom.core import connector_rules
from torchloom.core.accelerators import CPUAccelerator, CUDAAccelerator, MPSAccelerator, XLAAccelerator
from torchloom.core.accelerators.accelerator import Accelerator, DeviceSpec
from torchloom.core.checkpoint.io import CheckpointIO, TorchCheckpointIO
from torchloom.core.connector import Connector, Setup
from torchloom.core.environments.environment import ClusterEnvironment
from torchloom.core.environments.local import LocalEnvironment
from torchloom.core.environments.torchelastic import TorchElasticEnvironment
from torchloom.core.errors import ConfigurationError
from torchloom.core.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from torchloom.core.registry import STRATEGIES
from torchloom.core.strategies import DDPStrategy, ParallelStrategy, SingleDeviceStrategy, Strategy
from torchloom.core.utils import rank_zero

_CLUSTER_PREFIXES = ("SLURM_", "LSB_", "LSF_", "JSM_", "OMPI_", "PMI_", "PMIX_", "MV2_", "TORCHELASTIC_", "KUBERNETES_")
_CLUSTER_NAMES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR")


def clear_cluster_variables(mp: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(_CLUSTER_PREFIXES) or name in (*_CLUSTER_NAMES, "MASTER_PORT", "PJRT_DEVICE"):
            mp.delenv(name)


def set_machine(
    mp: pytest.MonkeyPatch, *, cuda: int = 0, mps: bool = False, tpu: int = 0, interactive: bool = False
) -> None:
    """Pretends this machine has ``cuda`` GPUs, an MPS device, ``tpu`` XLA devices; and a REPL or a script."""
    mp.setattr(torch.cuda, "device_count", lambda: cuda)
    mp.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    mp.setattr(torch.backends.mps, "is_available", lambda: mps)
    mp.setattr(XLAAccelerator, "is_available", staticmethod(lambda: tpu > 0))
    mp.setattr(XLAAccelerator, "auto_device_count", staticmethod(lambda: tpu))
    if interactive:
        mp.setattr(sys, "ps1", ">>> ", raising=False)
    else:
        mp.delattr(sys, "ps1", raising=False)
        mp.setattr(sys.modules["__main__"], "__file__", "train.py", raising=False)


@pytest.fixture(autouse=True)
def cpu_script(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[None]:
    """Default for every test: a plain CPU machine, outside any cluster, running a script file.

    Tests marked ``cuda`` see the real machine instead.
    """
    clear_cluster_variables(monkeypatch)
    if request.node.get_closest_marker("cuda") is None:
        set_machine(monkeypatch)
    rank = rank_zero.global_rank()
    yield
    rank_zero.set_global_rank(rank)  # resolving a ParallelStrategy sets this process's rank


@pytest.fixture
def two_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setenv("NODE_RANK", "0")


def resolve(**kwargs: Any) -> Setup:
    return Connector(**kwargs).resolve()


def rejected(*parts: str, **kwargs: Any) -> str:
    """Resolves ``kwargs``, expecting a ConfigurationError whose message contains every one of ``parts``."""
    with pytest.raises(ConfigurationError) as info:
        resolve(**kwargs)
    message = str(info.value)
    for part in parts:
        assert part in message, f"{part!r} missing from: {message}"
    return message


def cpus(n: int) -> list[torch.device]:
    return [torch.device("cpu")] * n


def cudas(*indices: int) -> list[torch.device]:
    return [torch.device("cuda", i) for i in indices]


# ---------------------------------------------------------------------- strategies written by "users"
class MyStrategy(Strategy):
    """A custom single-process strategy written against the base class only."""

    @property
    @override
    def root_device(self) -> torch.device:
        return torch.device("cpu")


class MyParallelStrategy(ParallelStrategy):
    """A custom multi-process strategy; a single-process launcher-less one is allowed."""


class XLASingleForTest(SingleDeviceStrategy):
    uses_xla = True


class XLADDPForTest(DDPStrategy):
    uses_xla = True


@pytest.fixture
def xla_strategies() -> Iterator[None]:
    """Stand-ins under the XLA names (the real ones need torch-xla); the real registrations come back after."""
    names = ("single_xla", "xla")
    saved = {name: (STRATEGIES.factory(name), STRATEGIES.init_params(name)) for name in names if name in STRATEGIES}
    STRATEGIES.register("single_xla", XLASingleForTest, override=True)
    STRATEGIES.register("xla", XLADDPForTest, override=True)
    yield
    for name in names:
        STRATEGIES.remove(name)
        if name in saved:
            factory, params = saved[name]
            STRATEGIES.register(name, factory, override=True, **params)


class RecordingEnvironment(LocalEnvironment):
    """The local environment, remembering what ``validate`` was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.validated: list[tuple[int, int]] = []

    @override
    def validate(self, num_devices: int, num_nodes: int) -> None:
        self.validated.append((num_devices, num_nodes))
        super().validate(num_devices, num_nodes)


# ====================================================================== accepted spellings
@pytest.mark.parametrize(
    ("machine", "accelerator", "expected", "devices"),
    [
        ({}, "auto", CPUAccelerator, cpus(1)),
        ({}, "cpu", CPUAccelerator, cpus(1)),
        ({}, "CPU", CPUAccelerator, cpus(1)),
        ({"cuda": 2}, "auto", CUDAAccelerator, cudas(0, 1)),
        ({"cuda": 2}, "cuda", CUDAAccelerator, cudas(0, 1)),
        ({"cuda": 2}, "gpu", CUDAAccelerator, cudas(0, 1)),
        ({"cuda": 2}, "cpu", CPUAccelerator, cpus(1)),
        ({"mps": True}, "auto", MPSAccelerator, [torch.device("mps", 0)]),
        ({"mps": True}, "gpu", MPSAccelerator, [torch.device("mps", 0)]),
        ({"mps": True, "cuda": 1}, "GPU", MPSAccelerator, [torch.device("mps", 0)]),
        ({"mps": True, "cuda": 1}, "cuda", CUDAAccelerator, cudas(0)),
    ],
)
def test_accelerator_names(
    monkeypatch: pytest.MonkeyPatch,
    machine: dict[str, Any],
    accelerator: str,
    expected: type[Accelerator],
    devices: list[torch.device],
) -> None:
    set_machine(monkeypatch, **machine)
    setup = resolve(accelerator=accelerator)
    assert type(setup.accelerator) is expected
    assert setup.devices == devices
    assert setup.strategy.accelerator is setup.accelerator


def test_accelerator_auto_prefers_tpu(monkeypatch: pytest.MonkeyPatch, xla_strategies: None) -> None:
    set_machine(monkeypatch, cuda=2, mps=True, tpu=4)
    setup = resolve()
    assert type(setup.accelerator) is XLAAccelerator
    assert type(setup.strategy) is XLADDPForTest
    assert setup.devices == [torch.device("xla", i) for i in range(4)]
    single = resolve(accelerator="tpu", devices=1)
    assert type(single.strategy) is XLASingleForTest
    assert single.strategy.root_device == torch.device("xla", 0)


def test_accelerator_instance_is_used_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    accelerator = CPUAccelerator()
    assert resolve(accelerator=accelerator).accelerator is accelerator
    set_machine(monkeypatch, cuda=1)
    cuda = CUDAAccelerator()
    assert resolve(accelerator=cuda).accelerator is cuda


@pytest.mark.parametrize(
    ("machine", "accelerator", "devices", "expected"),
    [
        ({}, "cpu", "auto", cpus(1)),
        ({}, "cpu", 1, cpus(1)),
        ({}, "cpu", 3, cpus(3)),
        ({}, "cpu", "2", cpus(2)),
        ({}, "cpu", -1, cpus(1)),
        ({}, "cpu", "-1", cpus(1)),
        ({}, "cpu", " AUTO ", cpus(1)),
        ({"cuda": 4}, "cuda", "auto", cudas(0, 1, 2, 3)),
        ({"cuda": 4}, "cuda", 2, cudas(0, 1)),
        ({"cuda": 4}, "cuda", "3", cudas(0, 1, 2)),
        ({"cuda": 4}, "cuda", -1, cudas(0, 1, 2, 3)),
        ({"cuda": 4}, "cuda", [1, 3], cudas(1, 3)),
        ({"cuda": 4}, "cuda", (2,), cudas(2)),
        ({"cuda": 4}, "cuda", "0,2", cudas(0, 2)),
        ({"cuda": 4}, "cuda", "1,", cudas(1)),
        ({"mps": True}, "mps", 1, [torch.device("mps", 0)]),
        ({"mps": True}, "mps", [0], [torch.device("mps", 0)]),
        ({"mps": True}, "mps", "-1", [torch.device("mps", 0)]),
    ],
)
def test_devices_spellings(
    monkeypatch: pytest.MonkeyPatch,
    machine: dict[str, Any],
    accelerator: str,
    devices: DeviceSpec,
    expected: list[torch.device],
) -> None:
    set_machine(monkeypatch, **machine)
    setup = resolve(accelerator=accelerator, devices=devices)
    assert setup.devices == expected
    assert setup.num_devices == len(expected)
    if len(expected) > 1:
        assert isinstance(setup.strategy, DDPStrategy)
        assert setup.strategy.parallel_devices == expected
    else:
        assert setup.strategy.root_device == expected[0]


@pytest.mark.parametrize(
    ("devices", "expected", "strategy"),
    [
        (1, [0], XLASingleForTest),
        ("1", [0], XLASingleForTest),
        ([2], [2], XLASingleForTest),
        ("3,", [3], XLASingleForTest),
        ("auto", [0, 1, 2, 3], XLADDPForTest),
        (-1, [0, 1, 2, 3], XLADDPForTest),
        (4, [0, 1, 2, 3], XLADDPForTest),
    ],
)
def test_tpu_devices_spellings(
    monkeypatch: pytest.MonkeyPatch,
    xla_strategies: None,
    devices: DeviceSpec,
    expected: list[int],
    strategy: type[Strategy],
) -> None:
    set_machine(monkeypatch, tpu=4)
    setup = resolve(accelerator="tpu", devices=devices)
    assert setup.devices == [torch.device("xla", i) for i in expected]
    assert type(setup.strategy) is strategy


@pytest.mark.parametrize(
    ("strategy", "devices", "interactive", "expected", "start_method"),
    [
        ("auto", 1, False, SingleDeviceStrategy, None),
        ("auto", 2, False, DDPStrategy, "popen"),
        ("auto", 2, True, DDPStrategy, "notebook"),
        ("ddp", 2, False, DDPStrategy, "popen"),
        ("DDP", 1, False, DDPStrategy, "popen"),
        ("ddp_spawn", 2, False, DDPStrategy, "spawn"),
        ("Ddp_Fork", 2, False, DDPStrategy, "fork"),
        ("ddp_notebook", 2, True, DDPStrategy, "notebook"),
        ("ddp_fork", 2, True, DDPStrategy, "fork"),
        ("single_device", 1, False, SingleDeviceStrategy, None),
        ("SINGLE_DEVICE", "auto", True, SingleDeviceStrategy, None),
    ],
)
def test_strategy_names(
    monkeypatch: pytest.MonkeyPatch,
    strategy: str,
    devices: DeviceSpec,
    interactive: bool,
    expected: type[Strategy],
    start_method: str | None,
) -> None:
    set_machine(monkeypatch, interactive=interactive)
    setup = resolve(strategy=strategy, devices=devices)
    assert type(setup.strategy) is expected
    assert getattr(setup.strategy, "start_method", None) == start_method
    if start_method is None:
        assert setup.launcher is None
    else:
        assert setup.launcher is not None
        assert setup.launcher.is_interactive_compatible == (start_method in ("fork", "notebook"))


def test_single_device_name_takes_first_auto_device(monkeypatch: pytest.MonkeyPatch) -> None:
    set_machine(monkeypatch, cuda=4)
    setup = resolve(strategy="single_device")
    assert setup.devices == cudas(0)
    assert setup.strategy.root_device == torch.device("cuda", 0)


def test_auto_strategy_with_several_nodes_is_ddp(two_nodes: None) -> None:
    setup = resolve(num_nodes=2)
    assert isinstance(setup.strategy, DDPStrategy)
    assert setup.strategy.num_nodes == 2
    assert setup.strategy.world_size == 2
    assert setup.num_nodes == 2


def test_ddp_is_fully_wired() -> None:
    environment = RecordingEnvironment()
    io = TorchCheckpointIO()
    setup = resolve(strategy="ddp", devices=3, precision="bf16-mixed", plugins=[environment, io])
    strategy = setup.strategy
    assert isinstance(strategy, DDPStrategy)
    assert strategy.accelerator is setup.accelerator
    assert strategy.precision is setup.precision
    assert strategy.checkpoint_io is io is setup.checkpoint_io
    assert strategy.cluster_environment is environment is setup.cluster_environment
    assert strategy.parallel_devices == cpus(3)
    assert (strategy.num_nodes, strategy.num_processes, strategy.world_size, strategy.global_rank) == (1, 3, 3, 0)
    assert strategy.process_group_backend == "gloo"
    assert environment.validated == [(3, 1)]
    assert type(setup.launcher).__name__ == "SubprocessScriptLauncher"


@pytest.mark.parametrize(
    "make",
    [
        lambda: SingleDeviceStrategy(),
        lambda: DDPStrategy(),
        lambda: DDPStrategy(start_method="spawn", find_unused_parameters=True),
        lambda: MyStrategy(),
        lambda: MyParallelStrategy(),
    ],
    ids=["single", "ddp", "ddp_spawn_kwargs", "custom", "custom_parallel"],
)
def test_strategy_instances(make: Any) -> None:
    strategy = make()
    devices = 2 if isinstance(strategy, ParallelStrategy) else 1
    setup = resolve(strategy=strategy, devices=devices)
    assert setup.strategy is strategy
    assert strategy.accelerator is setup.accelerator
    assert strategy.precision is setup.precision
    if isinstance(strategy, ParallelStrategy):
        assert strategy.parallel_devices == cpus(2)
        assert strategy.cluster_environment is setup.cluster_environment


def test_strategy_carrying_its_own_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    set_machine(monkeypatch, cuda=4)
    accelerator, precision, io, environment = (
        CUDAAccelerator(),
        HalfPrecision("bf16-true"),
        TorchCheckpointIO(),
        LocalEnvironment(),
    )
    strategy = DDPStrategy(
        accelerator=accelerator,
        parallel_devices=cudas(1, 2),
        cluster_environment=environment,
        checkpoint_io=io,
        precision=precision,
    )
    setup = resolve(strategy=strategy)
    assert (setup.accelerator, setup.precision, setup.checkpoint_io, setup.cluster_environment) == (
        accelerator,
        precision,
        io,
        environment,
    )
    assert setup.devices == cudas(1, 2)
    # the same objects passed both ways are not a conflict; nor is the carried accelerator's own name
    again = DDPStrategy(accelerator=accelerator, parallel_devices=cudas(1, 2), precision=precision)
    setup = resolve(strategy=again, accelerator="cuda", devices=[1, 2], precision=precision)
    assert setup.strategy is again
    assert setup.accelerator is accelerator


def test_strategy_devices_choose_the_auto_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    set_machine(monkeypatch, cuda=2)
    setup = resolve(strategy=SingleDeviceStrategy("cpu"))
    assert type(setup.accelerator) is CPUAccelerator
    ddp = DDPStrategy(parallel_devices=cudas(0, 1))
    assert type(resolve(strategy=ddp).accelerator) is CUDAAccelerator
    assert ddp.process_group_backend == "nccl"


@pytest.mark.parametrize(
    ("precision", "expected_type", "name"),
    [
        (None, Precision, "32-true"),
        ("32-true", Precision, "32-true"),
        ("64-true", DoublePrecision, "64-true"),
        ("16-mixed", MixedPrecision, "16-mixed"),
        ("bf16-mixed", MixedPrecision, "bf16-mixed"),
        ("16-true", HalfPrecision, "16-true"),
        ("bf16-true", HalfPrecision, "bf16-true"),
        ("BF16-Mixed", MixedPrecision, "bf16-mixed"),
        (32, Precision, "32-true"),
        ("32", Precision, "32-true"),
        (64, DoublePrecision, "64-true"),
        ("64", DoublePrecision, "64-true"),
        (16, MixedPrecision, "16-mixed"),
        ("16", MixedPrecision, "16-mixed"),
        ("bf16", MixedPrecision, "bf16-mixed"),
    ],
)
def test_precision_spellings(precision: Any, expected_type: type[Precision], name: str) -> None:
    setup = resolve(precision=precision)
    assert type(setup.precision) is expected_type
    assert setup.precision.name == name
    assert setup.strategy.precision is setup.precision
    if isinstance(setup.precision, MixedPrecision):
        assert setup.precision.device_type == "cpu"  # not silently turned into bf16 on the CPU
        assert (setup.precision.scaler is not None) == (name == "16-mixed")


def test_mixed_precision_follows_the_device_type(monkeypatch: pytest.MonkeyPatch) -> None:
    set_machine(monkeypatch, cuda=1, mps=True)
    for accelerator, precision in (("cuda", "16-mixed"), ("mps", "bf16")):
        made = resolve(accelerator=accelerator, precision=precision).precision
        assert isinstance(made, MixedPrecision)
        assert made.device_type == accelerator
    given = MixedPrecision("16-mixed")  # device_type defaults to "cpu"; the connector points it at the GPU
    assert resolve(accelerator="cuda", precision=given).precision is given
    assert given.device_type == "cuda"


@pytest.mark.parametrize("where", ["precision", "plugins", "plugins_list"])
def test_precision_instance(where: str) -> None:
    precision = DoublePrecision()
    spellings: dict[str, dict[str, Any]] = {
        "precision": {"precision": precision},
        "plugins": {"plugins": precision},
        "plugins_list": {"plugins": [precision]},
    }
    kwargs = spellings[where]
    assert resolve(**kwargs).precision is precision


@pytest.mark.parametrize("as_tuple", [False, True])
def test_plugins_of_each_kind(as_tuple: bool) -> None:
    plugins: list[Any] = [TorchCheckpointIO(), RecordingEnvironment(), HalfPrecision("bf16-true")]
    setup = resolve(plugins=tuple(plugins) if as_tuple else plugins)
    assert (setup.checkpoint_io, setup.cluster_environment, setup.precision) == tuple(plugins)
    assert resolve(plugins=[]).precision.name == "32-true"


def test_cluster_environment_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    assert type(resolve().cluster_environment) is LocalEnvironment
    for name, value in {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29556")
    setup = resolve(devices=2)
    assert type(setup.cluster_environment) is TorchElasticEnvironment
    assert (setup.strategy.global_rank, setup.strategy.local_rank, setup.strategy.root_device) == (
        1,
        1,
        torch.device("cpu"),
    )
    rejected("WORLD_SIZE=2", "devices=3", devices=3)  # the environment's own validate() is called


def test_setup_is_immutable_and_resolved_once() -> None:
    connector = Connector(devices=2)
    setup = connector.resolve()
    assert connector.resolve() is setup
    with pytest.raises(dataclasses.FrozenInstanceError):
        setup.num_nodes = 3  # type: ignore[misc]


def test_resolution_starts_nothing() -> None:
    for strategy in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        resolve(strategy=strategy, devices=2)
    assert not torch.distributed.is_initialized()
    assert multiprocessing.active_children() == []


def test_interactive_session_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not connector_rules.is_interactive_session()  # a script (the autouse fixture)
    monkeypatch.delattr(sys.modules["__main__"], "__file__")  # python -c, or an embedded interpreter
    assert connector_rules.is_interactive_session()
    monkeypatch.setattr(sys.modules["__main__"], "__file__", "train.py", raising=False)
    monkeypatch.setattr(sys, "ps1", "In [1]: ", raising=False)  # IPython / Jupyter / REPL
    assert connector_rules.is_interactive_session()


@pytest.mark.cuda
def test_real_gpu_resolves_and_runs_a_mixed_precision_step() -> None:
    setup = resolve(accelerator="gpu", devices=1, precision="16-mixed")
    assert type(setup.accelerator) is CUDAAccelerator
    assert setup.devices == cudas(0)
    precision, strategy = setup.precision, setup.strategy
    assert isinstance(precision, MixedPrecision)
    assert precision.device_type == "cuda"
    strategy.setup_environment()
    model = torch.nn.Linear(8, 2)
    strategy.module_to_device(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = strategy.batch_to_device(torch.randn(4, 8))
    with precision.forward_context():
        out = model(batch)
    assert out.dtype == torch.float16  # autocast ran on the GPU
    strategy.backward(precision.convert_output(out).sum(), model)
    strategy.optimizer_step(optimizer)
    assert model.weight.device == torch.device("cuda", 0)
    assert torch.isfinite(model.weight).all()


# ====================================================================== rejections
VALID_ACCELERATORS = ("'auto', 'gpu', 'cpu', 'cuda', 'mps', 'tpu'", "Accelerator instance")


@pytest.mark.parametrize("accelerator", ["foo", "", "cuda:0", 3, None, 1.5, ["cpu"], torch.device("cpu")])
def test_rejects_unknown_accelerator(accelerator: Any) -> None:
    rejected(f"accelerator={accelerator!r}", *VALID_ACCELERATORS, accelerator=accelerator)


# explicit ids: tests/conftest.py treats a bare "cuda"/"tpu" keyword as the device marker
# "tpu" says why it is unavailable instead (tests/xla/test_xla_errors.py)
@pytest.mark.parametrize("accelerator", ["cuda", "mps", "gpu", "GPU"], ids=lambda name: f"name-{name}")
def test_rejects_unavailable_accelerator(accelerator: str) -> None:
    rejected(f"accelerator={accelerator!r}", "not available", "Available: 'auto', 'cpu'", accelerator=accelerator)


def test_rejects_unavailable_accelerator_instance() -> None:
    rejected("CUDAAccelerator()", "not available", "Available: 'auto', 'cpu'", accelerator=CUDAAccelerator())


@pytest.mark.parametrize("strategy", ["foo", "", "fsdp9", "DDP ", 5, None, DDPStrategy])
def test_rejects_unknown_strategy(strategy: Any) -> None:
    rejected(
        f"strategy={strategy!r}", "'auto', 'ddp', 'ddp_fork'", "'single_device'", "Strategy instance", strategy=strategy
    )


@pytest.mark.parametrize(
    ("machine", "accelerator", "devices", "bad", "valid"),
    [
        ({}, "cpu", 0, "devices=0", "process count"),
        ({}, "cpu", "0,1", "devices='0,1'", "process count"),
        ({}, "cpu", [0, 1], "devices=[0, 1]", "process count"),
        ({}, "cpu", "abc", "devices='abc'", "Accepted forms"),
        ({}, "cpu", None, "devices=None", "Accepted forms"),
        ({}, "cpu", 2.5, "devices=2.5", "Accepted forms"),
        ({}, "cpu", True, "devices=True", "Accepted forms"),
        ({}, "cpu", -2, "devices=-2", "Accepted forms"),
        ({"cuda": 2}, "cuda", 5, "devices=5", "available GPU indices are 0, 1"),
        ({"cuda": 2}, "cuda", [0, 0], "devices=[0, 0]", "only once"),
        ({"cuda": 2}, "cuda", [], "devices=[]", "Accepted forms"),
        ({"cuda": 2}, "cuda", "0", "devices='0'", "Accepted forms"),
        ({"cuda": 2}, "cuda", "3,", "devices='3,'", "available GPU indices are 0, 1"),
        ({"mps": True}, "mps", 2, "devices=2", "the one MPS device"),
    ],
)
def test_rejects_bad_devices(
    monkeypatch: pytest.MonkeyPatch, machine: dict[str, Any], accelerator: str, devices: Any, bad: str, valid: str
) -> None:
    set_machine(monkeypatch, **machine)
    rejected(bad, valid, accelerator=accelerator, devices=devices)


def test_wraps_a_custom_accelerators_parsing_error() -> None:
    class Picky(CPUAccelerator):
        @classmethod
        @override
        def parse_devices(cls, devices: DeviceSpec) -> list[torch.device]:
            raise TypeError("only whole numbers")

    rejected("devices=2.5", "only whole numbers", accelerator=Picky(), devices=2.5)


@pytest.mark.parametrize("num_nodes", [0, -1, "2", True, 1.5, None])
def test_rejects_bad_num_nodes(num_nodes: Any) -> None:
    rejected(f"num_nodes={num_nodes!r}", "positive int", num_nodes=num_nodes)


@pytest.mark.parametrize("precision", ["fp8", "16-MIXED-", 8, 0, True, 1.5, "", "transformer-engine", [16]])
def test_rejects_unknown_precision(precision: Any) -> None:
    rejected(f"precision={precision!r}", "'16-mixed', '16-true', '32-true', '64-true'", "'bf16'", precision=precision)


@pytest.mark.parametrize(
    ("plugins", "bad"),
    [
        ("16-mixed", "'16-mixed'"),
        (3, "3 (type int)"),
        ([LocalEnvironment(), LocalEnvironment()], "two ClusterEnvironment objects"),
        ([Precision(), DoublePrecision()], "two Precision objects"),
        ((TorchCheckpointIO(), TorchCheckpointIO()), "two CheckpointIO objects"),
        ([CPUAccelerator()], "CPUAccelerator() (type CPUAccelerator)"),
        ([[Precision()]], "type list"),
    ],
)
def test_rejects_bad_plugins(plugins: Any, bad: str) -> None:
    rejected(bad, "Precision, ClusterEnvironment or CheckpointIO instance", plugins=plugins)


def test_rejects_precision_given_twice() -> None:
    rejected("precision='bf16-mixed'", "plugins=", "Choose one", precision="bf16-mixed", plugins=[Precision()])
    rejected(
        "precision=DoublePrecision('64-true')",
        "strategy=DDPStrategy(...)",
        "Choose one",
        precision=DoublePrecision(),
        strategy=DDPStrategy(precision=Precision()),
    )
    rejected(
        "precision='64-true'", "Choose one", precision="64-true", strategy=SingleDeviceStrategy(precision=Precision())
    )


def test_rejects_strategy_objects_given_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    set_machine(monkeypatch, cuda=1)
    rejected(
        "accelerator='cuda'",
        "strategy=SingleDeviceStrategy(...)",
        "Choose one",
        accelerator="cuda",
        strategy=SingleDeviceStrategy(accelerator=CPUAccelerator()),
    )
    rejected(
        "accelerator=CPUAccelerator()",
        "Choose one",
        accelerator=CPUAccelerator(),
        strategy=DDPStrategy(accelerator=CPUAccelerator()),
    )
    rejected(
        "checkpoint io",
        "Choose one",
        strategy=DDPStrategy(checkpoint_io=TorchCheckpointIO()),
        plugins=TorchCheckpointIO(),
    )
    rejected(
        "cluster environment",
        "Choose one",
        strategy=DDPStrategy(cluster_environment=LocalEnvironment()),
        plugins=LocalEnvironment(),
        devices=2,
    )
    rejected(
        "devices=3",
        "Choose one",
        strategy=DDPStrategy(parallel_devices=cpus(2)),
        devices=3,
    )
    rejected(
        "'cuda'-device accelerator",
        "['cpu', 'cpu']",
        "accelerator='auto'",
        strategy=DDPStrategy(parallel_devices=cpus(2)),
        accelerator="cuda",
    )


@pytest.mark.parametrize(
    ("strategy", "devices", "num_nodes", "label"),
    [
        ("single_device", 2, 1, "strategy='single_device'"),
        ("single_device", 1, 2, "strategy='single_device'"),
        ("Single_Device", "0,1", 1, "strategy='Single_Device'"),
        (MyStrategy, "auto", 2, "strategy=MyStrategy(...)"),
    ],
)
def test_rejects_single_process_strategy_on_several_devices(
    monkeypatch: pytest.MonkeyPatch, two_nodes: None, strategy: Any, devices: DeviceSpec, num_nodes: int, label: str
) -> None:
    set_machine(monkeypatch, cuda=2)
    chosen = strategy if isinstance(strategy, str) else strategy()
    rejected(
        label,
        "one process on one device",
        f"num_nodes={num_nodes}",
        "'ddp'",
        "devices=1",
        strategy=chosen,
        devices=devices,
        num_nodes=num_nodes,
    )


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn", "ddp_notebook", "DDP", DDPStrategy(), MyParallelStrategy()])
def test_rejects_ddp_family_on_mps(monkeypatch: pytest.MonkeyPatch, strategy: Any) -> None:
    set_machine(monkeypatch, mps=True)
    label = f"strategy={strategy!r}" if isinstance(strategy, str) else f"strategy={type(strategy).__name__}"
    rejected(label, "not supported on MPS", "'auto' or 'single_device'", "accelerator='cpu'", strategy=strategy)


def test_rejects_non_xla_strategy_on_tpu(monkeypatch: pytest.MonkeyPatch) -> None:
    set_machine(monkeypatch, tpu=4)
    rejected("strategy='ddp'", "'tpu' accelerator", "XLA strategies: 'single_xla'", strategy="ddp")
    assert type(resolve(devices=1).strategy).__name__ == "SingleDeviceXLAStrategy"  # what 'auto' picks instead


def test_rejects_xla_strategy_off_tpu(monkeypatch: pytest.MonkeyPatch, xla_strategies: None) -> None:
    set_machine(monkeypatch, tpu=4)
    message = rejected("strategy='ddp'", "XLA strategies: 'single_xla', 'xla'", strategy="ddp")
    assert "uses_xla" in message
    rejected("strategy='xla'", "XLA strategy", "accelerator='tpu'", strategy="xla", accelerator="cpu", devices=2)


@pytest.mark.parametrize("strategy", ["ddp_fork", "ddp_notebook", DDPStrategy(start_method="fork")])
def test_rejects_fork_where_unavailable(monkeypatch: pytest.MonkeyPatch, strategy: Any) -> None:
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    rejected("fork", "Valid start methods here: 'spawn'", "'ddp_spawn'", strategy=strategy, devices=2)


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn", DDPStrategy()])
def test_rejects_script_launcher_in_interactive_session(monkeypatch: pytest.MonkeyPatch, strategy: Any) -> None:
    set_machine(monkeypatch, interactive=True)
    rejected("interactive session", "'ddp_notebook'", strategy=strategy, devices=2)


def test_rejects_float64_on_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    set_machine(monkeypatch, mps=True)
    for precision in ("64-true", 64, DoublePrecision()):
        rejected("'64-true'", "float64", "'bf16-mixed'", "'32-true'", precision=precision)


def test_rejects_factories_that_make_the_wrong_thing() -> None:
    STRATEGIES.register("not_a_strategy", lambda: object())
    try:
        rejected("'not_a_strategy'", "not a Strategy", "'ddp'", strategy="not_a_strategy")
    finally:
        STRATEGIES.remove("not_a_strategy")


def test_rejects_two_nodes_without_a_rendezvous() -> None:
    rejected("num_nodes=2", "MASTER_ADDR", num_nodes=2)


# ====================================================================== random combinations
class WeirdThing:
    def __repr__(self) -> str:
        return "<weird>"


WEIRD = [None, 1.5, True, -3, object(), WeirdThing(), [], {}, (), b"cpu", torch.device("cpu"), "\u00e9", "auto "]


def _instance(kind: str) -> st.SearchStrategy[Any]:
    """Fresh objects for every example, so wiring in one example cannot leak into the next."""
    makers: dict[str, list[Any]] = {
        "accelerator": [CPUAccelerator, CUDAAccelerator, MPSAccelerator, XLAAccelerator],
        "strategy": [
            SingleDeviceStrategy,
            lambda: SingleDeviceStrategy("cuda:1"),
            DDPStrategy,
            lambda: DDPStrategy(start_method="fork"),
            lambda: DDPStrategy(parallel_devices=cpus(2), precision=Precision()),
            lambda: DDPStrategy(accelerator=CPUAccelerator(), cluster_environment=LocalEnvironment()),
            MyStrategy,
            MyParallelStrategy,
        ],
        "precision": [Precision, DoublePrecision, lambda: MixedPrecision("16-mixed"), lambda: HalfPrecision("16-true")],
        "plugin": [Precision, LocalEnvironment, TorchCheckpointIO, RecordingEnvironment, CPUAccelerator, lambda: "x"],
    }
    return st.sampled_from(makers[kind]).map(lambda make: make())


_ARGUMENTS = {
    "accelerator": st.one_of(
        st.sampled_from(["auto", "cpu", "CPU", "cuda", "gpu", "mps", "tpu", "xpu", ""]),
        _instance("accelerator"),
        st.sampled_from(WEIRD),
        st.text(max_size=5),
    ),
    "strategy": st.one_of(
        st.sampled_from(["auto", "ddp", "DDP", "ddp_spawn", "ddp_fork", "ddp_notebook", "single_device", "fsdp"]),
        _instance("strategy"),
        st.sampled_from(WEIRD),
    ),
    "devices": st.one_of(
        st.sampled_from(["auto", "AUTO", "1", "2", "-1", "0", "0,1", "1,", "1,1", ",", "x", "3"]),
        st.integers(-3, 5),
        st.lists(st.integers(-1, 4), max_size=3),
        st.tuples(st.integers(0, 3)),
        st.sampled_from(WEIRD),
        st.text(max_size=4),
    ),
    "num_nodes": st.one_of(st.integers(-1, 3), st.sampled_from(WEIRD), st.just("2")),
    "precision": st.one_of(
        st.sampled_from([None, "32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]),
        st.sampled_from([16, 32, 64, "16", "32", "64", "bf16", "BF16", 8, "fp8", "bf16-true "]),
        _instance("precision"),
        st.sampled_from(WEIRD),
    ),
    "plugins": st.one_of(
        st.none(),
        _instance("plugin"),
        st.lists(_instance("plugin"), max_size=3).map(tuple),
        st.lists(_instance("plugin"), max_size=3),
        st.sampled_from(WEIRD),
    ),
}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arguments=st.fixed_dictionaries({}, optional=_ARGUMENTS),
    cuda=st.integers(0, 3),
    mps=st.booleans(),
    tpu=st.sampled_from([0, 0, 4]),
    interactive=st.booleans(),
    fork=st.booleans(),
    nodes_env=st.booleans(),
)
def test_any_arguments_resolve_or_raise_configuration_error(
    arguments: dict[str, Any], cuda: int, mps: bool, tpu: int, interactive: bool, fork: bool, nodes_env: bool
) -> None:
    with pytest.MonkeyPatch.context() as mp:
        clear_cluster_variables(mp)
        set_machine(mp, cuda=cuda, mps=mps, tpu=tpu, interactive=interactive)
        if not fork:
            mp.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn", "forkserver"])
        if nodes_env:
            mp.setenv("MASTER_ADDR", "127.0.0.1")
            mp.setenv("MASTER_PORT", "29557")
        setup: Setup | None = None
        message = ""
        try:
            setup = Connector(**arguments).resolve()
        except ConfigurationError as error:
            message = str(error)
    event("resolved" if setup is not None else "rejected")
    if setup is None:
        assert message  # every rejection explains itself
        return
    # what resolved is consistent and fully wired
    strategy = setup.strategy
    assert setup.devices and all(isinstance(d, torch.device) for d in setup.devices)
    assert strategy.accelerator is setup.accelerator
    assert strategy.precision is setup.precision
    assert strategy.checkpoint_io is setup.checkpoint_io
    assert isinstance(setup.cluster_environment, ClusterEnvironment)
    assert isinstance(setup.checkpoint_io, CheckpointIO)
    if isinstance(strategy, ParallelStrategy):
        assert strategy.parallel_devices == setup.devices
        assert strategy.cluster_environment is setup.cluster_environment
        assert strategy.num_nodes == setup.num_nodes
        assert setup.devices[0].type != "mps"
    else:
        assert setup.devices == [strategy.root_device]
        assert setup.num_nodes == 1
    if isinstance(setup.precision, MixedPrecision):
        assert setup.precision.device_type == setup.devices[0].type
