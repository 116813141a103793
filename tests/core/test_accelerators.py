"""Accelerators: device-spec parsing, availability, device setup and stats.

CUDA, MPS and XLA are exercised on the CPU by patching the device queries they make; the real-device
tests at the bottom are marked and run in the matching nox leg.
"""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from torchloom.core.accelerators import (
    Accelerator,
    CPUAccelerator,
    CUDAAccelerator,
    MPSAccelerator,
    XLAAccelerator,
)
from torchloom.core.errors import ConfigurationError, MissingDependencyError
from torchloom.core.registry import ACCELERATORS


def cpu(n: int) -> list[torch.device]:
    return [torch.device("cpu")] * n


def cuda(*indices: int) -> list[torch.device]:
    return [torch.device("cuda", i) for i in indices]


def xla(*indices: int) -> list[torch.device]:
    return [torch.device("xla", i) for i in indices]


# ---------------------------------------------------------------- registry and class attributes


@pytest.mark.parametrize(
    ("name", "cls", "backend"),
    [
        ("cpu", CPUAccelerator, "gloo"),
        ("cuda", CUDAAccelerator, "nccl"),
        ("mps", MPSAccelerator, "gloo"),
        ("tpu", XLAAccelerator, "xla"),
    ],
)
def test_registry_names_resolve_to_the_classes(name: str, cls: type[Accelerator], backend: str) -> None:
    accelerator = ACCELERATORS.get(name)
    assert type(accelerator) is cls
    assert cls.name == name
    assert cls.distributed_backend == backend
    assert repr(accelerator) == f"{cls.__name__}()"


# ---------------------------------------------------------------- CPU


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("auto", cpu(1)),
        ("AUTO", cpu(1)),
        (1, cpu(1)),
        (3, cpu(3)),
        ("2", cpu(2)),
        (" 4 ", cpu(4)),
        (-1, cpu(1)),
        ("-1", cpu(1)),
    ],
)
def test_cpu_parses_process_counts(spec: Any, expected: list[torch.device]) -> None:
    assert CPUAccelerator.parse_devices(spec) == expected


@pytest.mark.parametrize("spec", [0, "0", -2, "-3", True, 1.5, None, "two", "", {"n": 2}])
def test_cpu_rejects_bad_specs_naming_them_and_the_accepted_forms(spec: Any) -> None:
    with pytest.raises(ConfigurationError, match="Accepted forms: 'auto' or -1") as info:
        CPUAccelerator.parse_devices(spec)
    assert f"devices={spec!r}" in str(info.value)


@pytest.mark.parametrize("spec", [[0, 1], (0,), [], "0,1", "1,"])
def test_cpu_rejects_index_lists_with_an_explanation(spec: Any) -> None:
    with pytest.raises(ConfigurationError, match="no device index; pass a process count"):
        CPUAccelerator.parse_devices(spec)


def test_cpu_lists_of_non_integers_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="integer device indices"):
        CPUAccelerator.parse_devices(["0", "1"])  # type: ignore[list-item]


def test_cpu_availability_and_setup() -> None:
    accelerator = CPUAccelerator()
    assert CPUAccelerator.is_available()
    assert CPUAccelerator.auto_device_count() == 1
    accelerator.setup_device(torch.device("cpu"))
    with pytest.raises(ConfigurationError, match="'cuda:0'"):
        accelerator.setup_device(torch.device("cuda", 0))
    accelerator.teardown()


def test_cpu_device_stats_report_real_memory_and_cpu_use() -> None:
    accelerator = CPUAccelerator()
    busy_until = time.process_time() + 0.2
    while time.process_time() < busy_until:  # burn CPU so the percentage has something to measure
        pass
    stats = accelerator.get_device_stats(torch.device("cpu"))
    assert stats["cpu_percent"] > 10.0
    assert stats["cpu_user_seconds"] > 0.0
    if sys.platform.startswith("linux"):
        ballast = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB that must show up in the resident size
        with_ballast = accelerator.get_device_stats(torch.device("cpu"))
        assert with_ballast["cpu_rss_bytes"] >= stats["cpu_rss_bytes"] + 48 * 1024 * 1024
        assert with_ballast["cpu_peak_rss_bytes"] >= with_ballast["cpu_rss_bytes"] * 0.9
        del ballast


# ---------------------------------------------------------------- CUDA (device count patched)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.usefixtures("two_gpus")
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("auto", cuda(0, 1)),
        (-1, cuda(0, 1)),
        ("-1", cuda(0, 1)),
        (1, cuda(0)),
        (2, cuda(0, 1)),
        ("2", cuda(0, 1)),
        ([1], cuda(1)),
        ([1, 0], cuda(1, 0)),
        ((0,), cuda(0)),
        ("1,", cuda(1)),
        ("0, 1", cuda(0, 1)),
    ],
)
def test_cuda_parses_counts_and_indices(spec: Any, expected: list[torch.device]) -> None:
    assert CUDAAccelerator.parse_devices(spec) == expected
    assert CUDAAccelerator.is_available()
    assert CUDAAccelerator.auto_device_count() == 2


@pytest.mark.usefixtures("two_gpus")
@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (0, "0 GPUs means none"),
        ("0", "0 GPUs means none"),
        ([], "the list is empty"),
        ([0, 0], "only once"),
        ("1,1", "only once"),
        (3, "3 GPUs asked for; the available GPU indices are 0, 1"),
        ([2], "no GPU with index 2; the available GPU indices are 0, 1"),
        ("0,5", "no GPU with index 5"),
        ([-1], "no GPU with index -1"),
        (-2, "Accepted forms"),
        ("gpu", "Accepted forms"),
        ("0,a", "Accepted forms"),
        (False, "Accepted forms"),
        (1.0, "Accepted forms"),
    ],
)
def test_cuda_rejects_bad_specs(spec: Any, reason: str) -> None:
    with pytest.raises(ConfigurationError, match=r"Accepted forms: 'auto' or -1 \(all visible GPUs\)") as info:
        CUDAAccelerator.parse_devices(spec)
    assert f"devices={spec!r}" in str(info.value)
    assert reason in str(info.value)


@pytest.mark.usefixtures("no_gpus")
@pytest.mark.parametrize("spec", ["auto", -1, 1, [0]])
def test_cuda_without_gpus_says_so(spec: Any) -> None:
    assert not CUDAAccelerator.is_available()
    with pytest.raises(ConfigurationError, match="torch sees no CUDA GPU on this machine"):
        CUDAAccelerator.parse_devices(spec)


def test_cuda_setup_device_makes_it_current(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    accelerator = CUDAAccelerator()
    accelerator.setup_device(torch.device("cuda", 1))
    assert chosen == [torch.device("cuda", 1)]
    with pytest.raises(ConfigurationError, match=r"'cpu'.*expected a device like 'cuda:0'"):
        accelerator.setup_device(torch.device("cpu"))
    assert len(chosen) == 1


@pytest.mark.parametrize("initialised", [True, False])
def test_cuda_teardown_empties_the_cache_only_if_cuda_was_used(
    monkeypatch: pytest.MonkeyPatch, initialised: bool
) -> None:
    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    CUDAAccelerator().teardown()
    assert emptied == ([True] if initialised else [])


def test_cuda_device_stats_come_from_the_caching_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[torch.device] = []

    def memory_stats(device: torch.device) -> dict[str, int]:
        asked.append(device)
        return {"allocated_bytes.all.current": 1024, "num_ooms": 0}

    monkeypatch.setattr(torch.cuda, "memory_stats", memory_stats)
    stats = CUDAAccelerator().get_device_stats(torch.device("cuda", 1))
    assert stats == {"allocated_bytes.all.current": 1024, "num_ooms": 0}
    assert asked == [torch.device("cuda", 1)]


# ---------------------------------------------------------------- MPS (availability patched)


@pytest.mark.parametrize("spec", ["auto", 1, "1", -1, "-1", [0], "0,"])
def test_mps_has_exactly_one_device(spec: Any) -> None:
    assert MPSAccelerator.parse_devices(spec) == [torch.device("mps", 0)]


@pytest.mark.parametrize("spec", [2, "2", 0, [1], [0, 0], "0,1", [], "mps"])
def test_mps_rejects_anything_but_the_one_device(spec: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"Accepted forms: 'auto', 1, '1', -1, '-1', \[0\], '0,'"):
        MPSAccelerator.parse_devices(spec)


def test_mps_availability_stats_and_teardown(monkeypatch: pytest.MonkeyPatch) -> None:
    emptied: list[bool] = []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 100)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 300)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 1000)
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: emptied.append(True))
    accelerator = MPSAccelerator()
    assert MPSAccelerator.is_available()
    assert MPSAccelerator.auto_device_count() == 1
    accelerator.setup_device(torch.device("mps"))
    with pytest.raises(ConfigurationError, match="expected 'mps'"):
        accelerator.setup_device(torch.device("cpu"))
    assert accelerator.get_device_stats(torch.device("mps")) == {
        "mps_current_allocated_bytes": 100,
        "mps_driver_allocated_bytes": 300,
        "mps_recommended_max_bytes": 1000,
    }
    accelerator.teardown()
    assert emptied == [True]
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert not MPSAccelerator.is_available()
    accelerator.teardown()
    assert emptied == [True]


# ---------------------------------------------------------------- XLA (torch_xla faked or patched)


@pytest.fixture
def fake_torch_xla(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Installs a stand-in ``torch_xla`` package with the few functions the accelerator calls."""
    calls: dict[str, Any] = {"chips": 0, "devices_asked": 0, "memory_of": []}

    def module(name: str, **attributes: Any) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        for key, value in attributes.items():
            setattr(mod, key, value)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    def num_available_devices() -> int:
        calls["devices_asked"] += 1
        return int(calls["chips"]) * 2

    def get_memory_info(device: torch.device) -> dict[str, int]:
        calls["memory_of"].append(device)
        return {"bytes_used": 10, "bytes_limit": 100}

    module("torch_xla")
    module("torch_xla._internal")
    module(
        "torch_xla._internal.tpu",
        num_available_chips=lambda: calls["chips"],
        num_available_devices=num_available_devices,
    )
    module("torch_xla.core")
    module("torch_xla.core.xla_model", get_memory_info=get_memory_info)
    for variable in ("PJRT_DEVICE", "CPU_NUM_DEVICES", "GPU_NUM_DEVICES"):
        monkeypatch.delenv(variable, raising=False)
    return calls


def test_xla_without_torch_xla_gives_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def installed(module: str) -> bool:
        return not module.startswith("torch_xla")

    monkeypatch.setattr("torchloom.core.utils.imports.is_available", installed)
    monkeypatch.setattr("torchloom.core.accelerators.xla.is_available", installed)
    assert not XLAAccelerator.is_available()
    with pytest.raises(MissingDependencyError, match=r"pip install 'torchloom-core\[xla\]'"):
        XLAAccelerator.auto_device_count()
    with pytest.raises(MissingDependencyError, match="torch_xla"):
        XLAAccelerator().get_device_stats(torch.device("xla", 0))
    # one device needs no count, hence no torch_xla
    assert XLAAccelerator.parse_devices(1) == xla(0)


def test_xla_counts_cpu_devices_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, fake_torch_xla: dict[str, Any]
) -> None:
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    assert XLAAccelerator.auto_device_count() == 1
    monkeypatch.setenv("CPU_NUM_DEVICES", "4")
    assert XLAAccelerator.auto_device_count() == 4
    assert XLAAccelerator.is_available()
    monkeypatch.setenv("PJRT_DEVICE", "CUDA")
    monkeypatch.setenv("GPU_NUM_DEVICES", "3")
    assert XLAAccelerator.auto_device_count() == 3


def test_xla_counts_tpu_chips_without_asking_cloud_metadata_when_there_are_none(
    fake_torch_xla: dict[str, Any],
) -> None:
    assert XLAAccelerator.auto_device_count() == 0
    assert not XLAAccelerator.is_available()
    assert fake_torch_xla["devices_asked"] == 0  # the per-chip core count would query GCE metadata
    fake_torch_xla["chips"] = 4
    assert XLAAccelerator.auto_device_count() == 8
    assert XLAAccelerator.is_available()


def test_xla_device_stats_come_from_torch_xla(fake_torch_xla: dict[str, Any]) -> None:
    stats = XLAAccelerator().get_device_stats(torch.device("xla", 1))
    assert stats == {"bytes_used": 10, "bytes_limit": 100}
    assert fake_torch_xla["memory_of"] == [torch.device("xla", 1)]


@pytest.fixture
def four_xla_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(XLAAccelerator, "auto_device_count", staticmethod(lambda: 4))


@pytest.mark.usefixtures("four_xla_devices")
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (1, xla(0)),
        ("1", xla(0)),
        ("auto", xla(0, 1, 2, 3)),
        (-1, xla(0, 1, 2, 3)),
        ("-1", xla(0, 1, 2, 3)),
        (4, xla(0, 1, 2, 3)),
        ("4", xla(0, 1, 2, 3)),
        ([2], xla(2)),
        ("3,", xla(3)),
    ],
)
def test_xla_parses_one_all_or_a_single_index(spec: Any, expected: list[torch.device]) -> None:
    assert XLAAccelerator.parse_devices(spec) == expected


@pytest.mark.usefixtures("four_xla_devices")
@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (2, "either 1 or all 4 devices"),
        ("3", "either 1 or all 4 devices"),
        (8, "either 1 or all 4 devices"),
        ([0, 1], "give one index"),
        ("0,1", "give one index"),
        ([], "give one index"),
        ([4], "indices 0..3"),
        ([-1], "indices 0..3"),
        (0, "Accepted forms"),
        (-2, "Accepted forms"),
        ("tpu", "Accepted forms"),
    ],
)
def test_xla_rejects_other_specs(spec: Any, reason: str) -> None:
    with pytest.raises(ConfigurationError, match=r"Accepted forms: 1 \(one device\)") as info:
        XLAAccelerator.parse_devices(spec)
    assert reason in str(info.value)


def test_xla_with_no_devices_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(XLAAccelerator, "auto_device_count", staticmethod(lambda: 0))
    with pytest.raises(ConfigurationError, match="torch-xla finds no device"):
        XLAAccelerator.parse_devices("auto")


def test_xla_setup_device_only_accepts_xla_devices() -> None:
    XLAAccelerator().setup_device(torch.device("xla", 0))
    with pytest.raises(ConfigurationError, match="expected a device like 'xla:0'"):
        XLAAccelerator().setup_device(torch.device("cpu"))


def test_importing_the_packages_does_not_import_torch_xla(tmp_path: Path) -> None:
    # A torch_xla that fails on import: the packages, and XLA parsing of one device, must never touch it.
    (tmp_path / "torch_xla").mkdir()
    (tmp_path / "torch_xla" / "__init__.py").write_text("raise RuntimeError('torch_xla was imported')\n")
    script = textwrap.dedent(
        """
        import sys
        import torchloom.core.accelerators, torchloom.core.precision
        from torchloom.core.accelerators import XLAAccelerator
        assert XLAAccelerator.parse_devices(1)[0].type == "xla"
        assert "torch_xla" not in sys.modules
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---------------------------------------------------------------- real devices


@pytest.mark.cuda
def test_cuda_on_a_real_gpu() -> None:
    accelerator = CUDAAccelerator()
    devices = CUDAAccelerator.parse_devices("auto")
    assert devices == cuda(*range(torch.cuda.device_count()))
    accelerator.setup_device(devices[-1])
    assert torch.cuda.current_device() == devices[-1].index
    tensor = torch.ones(1024, 1024, device=devices[-1])
    stats = accelerator.get_device_stats(devices[-1])
    assert stats["allocated_bytes.all.current"] >= tensor.numel() * 4
    del tensor
    accelerator.teardown()
    assert torch.cuda.memory_reserved(devices[-1]) == 0


@pytest.mark.cuda
def test_cuda_queries_do_not_initialise_cuda() -> None:
    # in a fresh process: forked workers can only use CUDA if the parent never initialised it
    script = textwrap.dedent(
        """
        import torch
        from torchloom.core.accelerators import CUDAAccelerator
        assert CUDAAccelerator.is_available()
        CUDAAccelerator.parse_devices("auto")
        CUDAAccelerator.parse_devices([0])
        assert not torch.cuda.is_initialized()
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.tpu
def test_xla_on_a_real_runtime() -> None:
    accelerator = XLAAccelerator()
    assert XLAAccelerator.is_available()
    devices = XLAAccelerator.parse_devices(1)
    accelerator.setup_device(devices[0])
    if os.environ.get("PJRT_DEVICE", "TPU") == "TPU":  # XLA:CPU has no memory figures
        assert accelerator.get_device_stats(devices[0])
