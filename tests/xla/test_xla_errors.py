"""Clear errors around torch-xla, checked without it: missing, built for another torch, no XLA device, and
precisions XLA cannot run. These run in every environment (the main one has no torch-xla)."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import sys
import types
from typing import Any

import pytest
import torch

from torchloom.core import Connector
from torchloom.core.accelerators import xla as xla_accelerator
from torchloom.core.errors import ConfigurationError, MissingDependencyError
from torchloom.core.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from torchloom.core.precision.xla import XLAPrecision, as_xla_precision

TORCH_MINOR = ".".join(torch.__version__.split("+")[0].split(".")[:2])


@pytest.fixture
def no_torch_xla(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xla_accelerator, "is_available", lambda module: not module.startswith("torch_xla"))


@pytest.fixture
def torch_xla_without_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in torch_xla that finds no TPU chip, with PJRT_DEVICE unset."""

    def module(name: str, **attributes: Any) -> None:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        for key, value in attributes.items():
            setattr(mod, key, value)
        monkeypatch.setitem(sys.modules, name, mod)

    module("torch_xla")
    module("torch_xla._internal")
    module("torch_xla._internal.tpu", num_available_chips=lambda: 0, num_available_devices=lambda: 0)
    monkeypatch.setattr(xla_accelerator, "is_available", lambda module: True)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: f"{TORCH_MINOR}.0")
    monkeypatch.delenv("PJRT_DEVICE", raising=False)


@pytest.mark.usefixtures("no_torch_xla")
@pytest.mark.parametrize("strategy", ["auto", "single_xla"])
def test_tpu_without_torch_xla_names_the_install_line_and_the_matching_torch(strategy: str) -> None:
    with pytest.raises(MissingDependencyError) as info:
        Connector(accelerator="tpu", strategy=strategy).resolve()
    message = str(info.value)
    assert "pip install 'torchloom-core[xla]'" in message
    assert "torch-xla 2.9 needs torch 2.9.x" in message
    assert f"this environment has torch {torch.__version__.split('+')[0]}" in message


@pytest.mark.usefixtures("no_torch_xla")
def test_auto_skips_the_tpu_when_torch_xla_is_missing() -> None:
    assert Connector().resolve().accelerator.name != "tpu"


def test_torch_xla_built_for_another_torch_says_which_versions_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xla_accelerator, "is_available", lambda module: True)
    other = "2.9.0" if TORCH_MINOR != "2.9" else "2.8.1"
    monkeypatch.setattr(importlib.metadata, "version", lambda name: other)
    with pytest.raises(MissingDependencyError) as info:
        xla_accelerator.import_torch_xla("torch_xla", "The test")
    message = str(info.value)
    assert f"torch-xla {other} is installed, which works only with torch {other[:3]}.x" in message
    assert f"pip install torch=={other[:3]}.* torch-xla=={other}" in message
    with pytest.raises(MissingDependencyError, match="works only with torch"):
        Connector(accelerator="tpu").resolve()
    with pytest.raises(MissingDependencyError, match="works only with torch"):  # auto must not hide a broken install
        Connector().resolve()


@pytest.mark.usefixtures("torch_xla_without_devices")
def test_tpu_with_no_xla_device_says_so_and_how_to_use_the_cpu_backend() -> None:
    with pytest.raises(ConfigurationError) as info:
        Connector(accelerator="tpu").resolve()
    message = str(info.value)
    assert "accelerator='tpu' found no XLA device" in message
    assert "PJRT_DEVICE=CPU" in message
    assert "accelerator='cpu'" in message


BUILT_IN = {"32-true": Precision, "bf16-true": HalfPrecision, "bf16-mixed": MixedPrecision}


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_the_built_in_precisions_become_their_xla_variant(name: str) -> None:
    built = BUILT_IN[name]() if name == "32-true" else BUILT_IN[name](name)
    adapted = as_xla_precision(built, "S")
    assert type(adapted) is XLAPrecision
    assert adapted.name == name
    mine = XLAPrecision(name)
    assert as_xla_precision(mine, "S") is mine


@pytest.mark.parametrize("precision", [MixedPrecision("16-mixed"), HalfPrecision("16-true"), DoublePrecision()])
def test_precisions_xla_cannot_run_are_refused_with_the_valid_ones(precision: Precision) -> None:
    with pytest.raises(ConfigurationError) as info:
        as_xla_precision(precision, "SingleDeviceXLAStrategy")
    message = str(info.value)
    assert f"SingleDeviceXLAStrategy cannot run precision={precision.name!r}" in message
    assert "'32-true', 'bf16-true', 'bf16-mixed'" in message


@pytest.mark.parametrize("name", ["16-mixed", "bf16", 16, None])
def test_xla_precision_rejects_other_names(name: Any) -> None:
    with pytest.raises(ConfigurationError, match="Valid: '32-true', 'bf16-true', 'bf16-mixed'"):
        XLAPrecision(name)


class _WritesAMarker:
    """Unpickling it with plain pickle (as DCP reads '.metadata') would call ``open(marker, "w")``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_spmd_checkpoint_metadata_that_would_run_code_is_refused_before_dcp_reads_it(tmp_path: Any) -> None:
    import pickle

    from torchloom.core.checkpoint import distributed as sharded_io
    from torchloom.core.errors import CheckpointError
    from torchloom.core.strategies.single_device import SingleDeviceStrategy
    from torchloom.core.strategies.xla_spmd import XLASPMDStrategy

    strategy = XLASPMDStrategy()
    folder, marker = tmp_path / "spmd.ckpt", tmp_path / "MARKER"
    sharded_io.save_sharded(folder, {"weight": torch.ones(2), "step": 3}, {"weight": "data", "step": "data"}, strategy)
    assert SingleDeviceStrategy("cpu").load_checkpoint(folder)["step"] == 3  # it loads until .metadata is replaced
    with open(folder / ".metadata", "wb") as file:
        pickle.dump(_WritesAMarker(str(marker)), file, protocol=2)
    with pytest.raises(CheckpointError, match=r"DCP metadata file .* which could run arbitrary code"):
        strategy.load_checkpoint(folder, {"step": 0})
    assert not marker.exists()


@pytest.mark.usefixtures("torch_xla_without_devices")
@pytest.mark.parametrize("devices", [1, [1]])
def test_spmd_refuses_a_subset_of_the_devices_it_would_drive_all_of(
    monkeypatch: pytest.MonkeyPatch, devices: Any
) -> None:
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    monkeypatch.setenv("CPU_NUM_DEVICES", "4")
    with pytest.raises(ConfigurationError) as info:
        Connector(accelerator="tpu", strategy="xla_spmd", devices=devices).resolve()
    message = str(info.value)
    assert "drives every device of this host (4)" in message
    assert "Valid: devices='auto', -1 or 4" in message and "strategy='single_xla'" in message
    setup = Connector(accelerator="tpu", strategy="xla_spmd_data", devices="auto").resolve()
    assert len(setup.devices) == 4
