"""Bad checkpoints on disk are refused with ``CheckpointError``, by every way there is to load one.

Each case is a real file or directory: a checkpoint truncated at hypothesis-chosen offsets, random bytes,
a valid torch file holding something other than a dict, a pickle that would run code (it would write a
marker file: the marker must not appear), a checkpoint of a newer torchloom, a corrupt or malicious
sharded-checkpoint metadata file, incomplete sharded and DeepSpeed directories. Each goes through
``TorchCheckpointIO``, ``SingleDeviceStrategy.load_checkpoint``, ``Fabric.load`` and, for Trainer
checkpoints, ``Trainer.fit(ckpt_path=...)`` and ``LoomModule.load_from_checkpoint``. The error is always
``CheckpointError`` (never torch's own exception, never a hang) and names the path.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from torchloom.core.accelerators import CPUAccelerator
from torchloom.core.checkpoint import TorchCheckpointIO
from torchloom.core.checkpoint import deepspeed as ds_io
from torchloom.core.checkpoint import distributed as sharded_io
from torchloom.core.checkpoint.checks import VERSION_KEY, running_version
from torchloom.core.errors import CheckpointError, ConfigurationError, TorchloomError
from torchloom.core.strategies import SingleDeviceStrategy
from torchloom.fabric import Fabric

from ..trainer.engine_models import Regressor, loader, quiet_trainer

# torch warns about the pickle protocol of random bytes before it refuses them
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CORRUPT = "not a complete torch checkpoint file"
# random bytes may happen to spell a pickle GLOBAL (b"cfoo\nbar\n"): then the refusal names it instead
CORRUPT_OR_UNSAFE = rf"{CORRUPT}|was refused: it holds pickled objects that need importing and calling"


# ---------------------------------------------------------------------------------------------- the loaders
def load_with_io(path: Path) -> Any:
    return TorchCheckpointIO().load_checkpoint(path)


def load_with_strategy(path: Path) -> Any:
    return SingleDeviceStrategy("cpu", accelerator=CPUAccelerator()).load_checkpoint(path)


def load_with_fabric(path: Path) -> Any:
    return Fabric(accelerator="cpu").load(path)


def load_into_fabric_state(path: Path) -> Any:
    """``fabric.load`` into live objects: a refused checkpoint must leave them as they were."""
    fabric = Fabric(accelerator="cpu")
    torch.manual_seed(0)
    model = fabric.setup(nn.Linear(4, 2))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    state: dict[str, Any] = {"model": model, "step": -1}
    try:
        return fabric.load(path, state)
    except CheckpointError:
        assert state["step"] == -1
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
        raise


LOADERS: list[Callable[[Path], Any]] = [load_with_io, load_with_strategy, load_with_fabric, load_into_fabric_state]


def fit_from(path: Path) -> Any:
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(Regressor(), loader(8), ckpt_path=path)


def module_from(path: Path) -> Any:
    return Regressor.load_from_checkpoint(path)


TRAINER_LOADERS: list[Callable[[Path], Any]] = [fit_from, module_from]


def refused(load: Callable[[Path], Any], path: Path, match: str) -> CheckpointError:
    """``load(path)`` raises ``CheckpointError`` naming ``path`` and matching ``match`` (a regex)."""
    with pytest.raises(CheckpointError, match=match) as error:
        load(path)
    assert str(path) in str(error.value), str(error.value)
    assert isinstance(error.value, TorchloomError) and isinstance(error.value, ValueError)
    return error.value


# ---------------------------------------------------------------------------------------------- good files
def fabric_checkpoint(path: Path) -> bytes:
    """A real ``Fabric.save`` of a model, an optimizer that has stepped and plain values; returns its bytes."""
    fabric = Fabric(accelerator="cpu")
    torch.manual_seed(0)
    module = nn.Linear(4, 2)
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9))
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 3, "notes": ["a", 1.5]})
    return path.read_bytes()


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return fabric_checkpoint(tmp_path_factory.mktemp("good") / "good.pt")


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Trainer checkpoint (one epoch of the regressor), full (with optimizer states)."""
    torch.manual_seed(0)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(Regressor(), loader(8))
    path = tmp_path_factory.mktemp("trainer") / "trained.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_the_good_files_load_everywhere(tmp_path: Path, good_bytes: bytes, trainer_checkpoint: Path) -> None:
    path = tmp_path / "good.pt"
    path.write_bytes(good_bytes)
    assert torch.load(path, weights_only=True)[VERSION_KEY] == running_version()  # Fabric records its version
    for load in LOADERS:
        load(path)
    assert set(load_with_fabric(path)) == {"model", "optimizer", "step", "notes"}  # ... and keeps it out
    for load in TRAINER_LOADERS:
        load(trainer_checkpoint)


def test_saving_a_state_that_uses_the_reserved_version_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"'torchloom_version'.*reserves"):
        Fabric(accelerator="cpu").save(tmp_path / "x.pt", {VERSION_KEY: "9.9.9"})
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------------------------------------- truncated, random
@pytest.mark.parametrize("load", LOADERS)
@SETTINGS
@given(fraction=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_a_truncated_checkpoint_is_refused(load: Callable[[Path], Any], good_bytes: bytes, fraction: float) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cut.pt"
        path.write_bytes(good_bytes[: int(len(good_bytes) * fraction)])
        refused(load, path, f"{CORRUPT}: it is truncated or corrupt.*Nothing in the file was executed")


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=2**31))
def test_a_checkpoint_truncated_at_any_byte_is_refused(good_bytes: bytes, cut: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cut.pt"
        path.write_bytes(good_bytes[: cut % len(good_bytes)])
        refused(load_with_io, path, CORRUPT)


@pytest.mark.parametrize("load", LOADERS)
@SETTINGS
@given(data=st.binary(max_size=4096))
def test_random_bytes_are_refused(load: Callable[[Path], Any], data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.pt"
        path.write_bytes(data)
        refused(load, path, CORRUPT_OR_UNSAFE)


@SETTINGS
@given(data=st.binary(min_size=1, max_size=2048))
def test_random_bytes_after_a_zip_header_are_refused(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "zip.pt"
        path.write_bytes(b"PK\x03\x04" + data)
        refused(load_with_io, path, CORRUPT_OR_UNSAFE)


@pytest.mark.parametrize("load", TRAINER_LOADERS)
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.999])
def test_the_trainer_refuses_a_truncated_checkpoint(
    tmp_path: Path, trainer_checkpoint: Path, load: Callable[[Path], Any], fraction: float
) -> None:
    data = trainer_checkpoint.read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: int(len(data) * fraction)])
    refused(load, path, CORRUPT)


@pytest.mark.parametrize("load", TRAINER_LOADERS)
def test_the_trainer_refuses_random_bytes(tmp_path: Path, load: Callable[[Path], Any]) -> None:
    path = tmp_path / "random.ckpt"
    path.write_bytes(os.urandom(1000))
    refused(load, path, CORRUPT)


# ---------------------------------------------------------------------------------------------- not a checkpoint
@pytest.mark.parametrize("load", LOADERS + TRAINER_LOADERS)
@pytest.mark.parametrize(
    "value", [torch.ones(3), [1, 2], "text", 7, None], ids=["tensor", "list", "str", "int", "none"]
)
def test_a_torch_file_holding_something_other_than_a_dict_is_refused(
    tmp_path: Path, load: Callable[[Path], Any], value: Any
) -> None:
    path = tmp_path / "not_a_dict.pt"
    torch.save(value, path)
    refused(load, path, rf"holds a {type(value).__name__}, not a dict: it is not a checkpoint")


@pytest.mark.parametrize("load", TRAINER_LOADERS)
def test_the_trainer_refuses_a_dict_that_is_not_its_checkpoint(
    tmp_path: Path, good_bytes: bytes, load: Callable[[Path], Any]
) -> None:
    path = tmp_path / "fabric.pt"
    path.write_bytes(good_bytes)
    refused(load, path, r"is not a Trainer checkpoint \(it has no 'state_dict'; keys: \['model', 'notes'")


# ---------------------------------------------------------------------------------------------- code in the pickle
class WritesAMarker:
    """Unpickling it (without weights_only) calls ``open(marker, "w")``: the file appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def malicious_files(folder: Path) -> dict[str, Path]:
    """The same payload three ways: inside a torch zip checkpoint, and as plain pickles (protocols 2 and 4)."""
    marker = folder / "MARKER"
    paths = {"torch.save": folder / "evil.pt", "pickle-2": folder / "evil2.pkl", "pickle-4": folder / "evil4.pkl"}
    torch.save({"model": {"w": torch.ones(2)}, "payload": WritesAMarker(marker)}, paths["torch.save"])
    for protocol in (2, 4):
        with open(paths[f"pickle-{protocol}"], "wb") as f:
            pickle.dump({"payload": WritesAMarker(marker)}, f, protocol=protocol)
    return paths


def test_the_payload_really_runs_code_when_loaded_without_weights_only(tmp_path: Path) -> None:
    """Checks the test's own payload: a plain load does create the marker."""
    path = malicious_files(tmp_path)["torch.save"]
    torch.load(path, weights_only=False)
    assert (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("kind", ["torch.save", "pickle-2", "pickle-4"])
@pytest.mark.parametrize("load", LOADERS + TRAINER_LOADERS)
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(
    tmp_path: Path, load: Callable[[Path], Any], kind: str
) -> None:
    path = malicious_files(tmp_path)[kind]
    if kind == "pickle-4":  # torch's restricted unpickler stops at protocol 4's framing, before any global
        error = refused(load, path, rf"{CORRUPT}.*Unsupported operand.*Nothing in the file was executed")
    else:
        error = refused(
            load,
            path,
            r"was refused: it holds pickled objects that need importing and calling io\.open, which could run "
            r"arbitrary code.*Nothing in the file was executed.*weights_only=False",
        )
    assert isinstance(error.__cause__, pickle.UnpicklingError)
    assert not (tmp_path / "MARKER").exists()


def test_a_trusted_file_loads_on_purpose_with_weights_only_false(tmp_path: Path) -> None:
    path = tmp_path / "trusted.pt"
    torch.save({"payload": WritesAMarker(tmp_path / "MARKER")}, path)
    assert not (tmp_path / "MARKER").exists()
    Fabric(accelerator="cpu").load(path, weights_only=False)
    assert (tmp_path / "MARKER").exists()


# ---------------------------------------------------------------------------------------------- versions
def newer_than_running() -> st.SearchStrategy[str]:
    major, minor = (int(part) for part in running_version().split(".")[:2])
    newer_minor = st.tuples(st.just(major), st.integers(minor + 1, 999), st.integers(0, 999))
    newer_major = st.tuples(st.integers(major + 1, 999), st.integers(0, 999), st.integers(0, 999))
    return st.one_of(newer_minor, newer_major).map(lambda v: ".".join(map(str, v)))


def not_newer_than_running() -> st.SearchStrategy[str]:
    major, minor = (int(part) for part in running_version().split(".")[:2])
    same = st.tuples(st.just(major), st.just(minor), st.integers(0, 999))  # a newer patch loads too
    older_minor = st.tuples(st.just(major), st.integers(0, max(minor - 1, 0)), st.integers(0, 999))
    older_major = st.tuples(st.integers(0, max(major - 1, 0)), st.integers(0, 999), st.integers(0, 999))
    versions = st.one_of(same, older_minor, older_major).filter(lambda v: v[:2] <= (major, minor))
    return versions.map(lambda v: ".".join(map(str, v)))


@pytest.mark.parametrize("load", LOADERS)
@SETTINGS
@given(version=newer_than_running())
def test_a_checkpoint_of_a_newer_torchloom_is_refused_naming_both_versions(
    load: Callable[[Path], Any], version: str
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "newer.pt"
        torch.save({VERSION_KEY: version, "model": {"weight": torch.ones(2, 4), "bias": torch.ones(2)}}, path)
        refused(
            load,
            path,
            rf"written by torchloom {version}, which is newer than the torchloom {running_version()} running here.*"
            r"Upgrade torchloom",
        )


@SETTINGS
@given(version=not_newer_than_running())
def test_a_checkpoint_of_an_older_or_the_same_torchloom_loads(version: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "older.pt"
        torch.save({VERSION_KEY: version, "step": 1}, path)
        assert load_with_strategy(path) == {VERSION_KEY: version, "step": 1}
        assert load_with_fabric(path) == {"step": 1}


@pytest.mark.parametrize("version", ["garbage", "", 3, None, "v1.0"])
def test_a_version_that_is_not_a_version_is_refused(tmp_path: Path, version: Any) -> None:
    path = tmp_path / "odd.pt"
    torch.save({VERSION_KEY: version}, path)
    refused(load_with_io, path, rf"records torchloom_version={version!r}, which is not a version")


@pytest.mark.parametrize("load", TRAINER_LOADERS)
def test_the_trainer_refuses_a_checkpoint_of_a_newer_torchloom(
    tmp_path: Path, trainer_checkpoint: Path, load: Callable[[Path], Any]
) -> None:
    checkpoint = torch.load(trainer_checkpoint, weights_only=True)
    assert checkpoint[VERSION_KEY] == running_version()
    checkpoint[VERSION_KEY] = "99.0.0"
    path = tmp_path / "newer.ckpt"
    torch.save(checkpoint, path)
    refused(load, path, rf"written by torchloom 99.0.0, which is newer than the torchloom {running_version()}")


# ---------------------------------------------------------------------------------------------- directories
class Alone:
    """A one-process stand-in for the strategy a sharded save coordinates with."""

    is_global_zero = True

    def barrier(self, name: str | None = None) -> None:
        pass

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision


def sharded_checkpoint(path: Path, state: dict[str, Any] | None = None) -> Path:
    state = state or {"model": nn.Linear(4, 2).state_dict(), "step": 3}
    sharded_io.save_sharded(path, state, dict.fromkeys(state, "data"), Alone())
    assert sharded_io.is_sharded_checkpoint(path)
    return path


def test_a_sharded_checkpoint_records_the_version_and_loads(tmp_path: Path) -> None:
    path = sharded_checkpoint(tmp_path / "sharded")
    assert sharded_io.read_meta(path)[VERSION_KEY] == running_version()
    for load in (load_with_strategy, load_with_fabric):
        assert load(path)["step"] == 3


META_DAMAGE: dict[str, Callable[[Path], object]] = {
    "truncated": lambda meta: meta.write_bytes(meta.read_bytes()[: len(meta.read_bytes()) // 2]),
    "random": lambda meta: meta.write_bytes(os.urandom(500)),
    "empty": lambda meta: meta.write_bytes(b""),
}


@pytest.mark.parametrize("load", [*LOADERS[1:], sharded_io.read_meta])
@pytest.mark.parametrize("damage", sorted(META_DAMAGE))
def test_a_sharded_checkpoint_with_a_corrupt_meta_file_is_refused(
    tmp_path: Path, load: Callable[[Path], Any], damage: str
) -> None:
    path = sharded_checkpoint(tmp_path / "sharded")
    META_DAMAGE[damage](path / sharded_io.META_FILE)
    error = refused(load, path, rf"'{path / sharded_io.META_FILE}' is {CORRUPT}")
    assert str(path / sharded_io.META_FILE) in str(error)


@pytest.mark.parametrize("load", [*LOADERS[1:], *TRAINER_LOADERS])
@SETTINGS
@given(data=st.binary(max_size=1024))
def test_a_sharded_checkpoint_with_a_random_meta_file_is_refused(load: Callable[[Path], Any], data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = sharded_checkpoint(Path(folder) / "sharded")
        (path / sharded_io.META_FILE).write_bytes(data)
        refused(load, path, CORRUPT_OR_UNSAFE)


def test_a_sharded_meta_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = sharded_checkpoint(tmp_path / "sharded")
    torch.save({"payload": WritesAMarker(tmp_path / "MARKER")}, path / sharded_io.META_FILE)
    for load in LOADERS[1:]:
        refused(load, path, r"io\.open.*Nothing in the file was executed")
    assert not (tmp_path / "MARKER").exists()


def test_a_sharded_meta_file_of_a_newer_torchloom_is_refused(tmp_path: Path) -> None:
    path = sharded_checkpoint(tmp_path / "sharded")
    meta = torch.load(path / sharded_io.META_FILE, weights_only=True)
    torch.save({**meta, VERSION_KEY: "42.1.0"}, path / sharded_io.META_FILE)
    for load in LOADERS[1:]:
        refused(load, path, r"written by torchloom 42\.1\.0, which is newer")


def test_dcp_metadata_that_would_run_code_is_refused_before_dcp_unpickles_it(tmp_path: Path) -> None:
    """DCP reads its '.metadata' with plain pickle.load; torchloom checks it first with a restricted unpickler."""
    path = sharded_checkpoint(tmp_path / "sharded")
    with open(path / ".metadata", "wb") as f:
        pickle.dump(WritesAMarker(tmp_path / "MARKER"), f, protocol=2)
    for load in [*LOADERS[1:], *TRAINER_LOADERS]:
        refused(load, path, r"DCP metadata file .* io\.open, which could run arbitrary code.*Nothing in the")
    assert not (tmp_path / "MARKER").exists()


@SETTINGS
@given(fraction=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_truncated_dcp_metadata_is_refused(fraction: float) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = sharded_checkpoint(Path(folder) / "sharded")
        data = (path / ".metadata").read_bytes()
        (path / ".metadata").write_bytes(data[: int(len(data) * fraction)])
        refused(load_with_strategy, path, r"is incomplete or corrupt: its DCP metadata file")


@pytest.mark.parametrize("missing", [sharded_io.META_FILE, ".metadata"])
@pytest.mark.parametrize("load", [*LOADERS, *TRAINER_LOADERS])
def test_an_incomplete_sharded_directory_is_refused(tmp_path: Path, load: Callable[[Path], Any], missing: str) -> None:
    path = sharded_checkpoint(tmp_path / "sharded")
    (path / missing).unlink()
    refused(load, path, rf"is an incomplete sharded checkpoint: it lacks '{missing}'")


def incomplete_deepspeed_directory(path: Path) -> Path:
    """What a DeepSpeed save cut short leaves: DeepSpeed's files, without torchloom's extra file (written last)."""
    (path / ds_io.TAG).mkdir(parents=True)
    (path / "latest").write_text(ds_io.TAG)
    torch.save({"module": {"weight": torch.ones(2)}}, path / ds_io.TAG / "mp_rank_00_model_states.pt")
    return path


@pytest.mark.parametrize("load", [*LOADERS, *TRAINER_LOADERS])
def test_an_incomplete_deepspeed_directory_is_refused(tmp_path: Path, load: Callable[[Path], Any]) -> None:
    path = incomplete_deepspeed_directory(tmp_path / "ds")
    refused(load, path, rf"is an incomplete DeepSpeed checkpoint: it lacks '{ds_io.EXTRA_FILE}'.*cut short")


def test_read_extra_refuses_an_incomplete_or_corrupt_deepspeed_directory(tmp_path: Path) -> None:
    path = incomplete_deepspeed_directory(tmp_path / "ds")
    refused(ds_io.read_extra, path, "is not a complete torchloom DeepSpeed checkpoint")
    (path / ds_io.EXTRA_FILE).write_bytes(os.urandom(300))
    refused(ds_io.read_extra, path, rf"'{path / ds_io.EXTRA_FILE}' is {CORRUPT}")
    torch.save({"format": "torchloom-deepspeed-checkpoint", "version": 1, VERSION_KEY: "7.0"}, path / ds_io.EXTRA_FILE)
    refused(ds_io.read_extra, path, r"written by torchloom 7\.0, which is newer")


@pytest.mark.parametrize("load", [*LOADERS, *TRAINER_LOADERS])
def test_a_directory_that_is_no_checkpoint_is_refused(tmp_path: Path, load: Callable[[Path], Any]) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hi")
    refused(load, tmp_path / "folder", "is a directory but not a torchloom checkpoint")


def deepspeed_directory(path: Path, partition: dict[str, Any]) -> Path:
    """A complete-looking DeepSpeed directory whose optimizer partition file holds ``partition``."""
    incomplete_deepspeed_directory(path)
    torch.save(partition, path / ds_io.TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    ds_io.write_extra(path, {"model": ds_io.MODULE}, {"step": 3})
    return path


def test_deepspeed_partition_files_as_deepspeed_writes_them_pass_the_check(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    partition = {"zero_stage": ZeroStageEnum(2), "loss_scaler": LossScaler(1.0), "state": torch.ones(3)}
    ds_io.check_partitions(deepspeed_directory(tmp_path / "ds", partition), ds_io.TAG)


def test_a_deepspeed_partition_file_that_would_run_code_is_refused_before_deepspeed_reads_it(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    marker = tmp_path / "MARKER"
    path = deepspeed_directory(tmp_path / "ds", {"state": torch.ones(3), "payload": WritesAMarker(marker)})
    partition = rf"'{path / ds_io.TAG / 'zero_pp_rank_0_mp_rank_00_optim_states.pt'}' was refused"
    refused(lambda p: ds_io.check_partitions(p, ds_io.TAG), path, partition)
    refused(ds_io.load_consolidated, path, partition)  # zero_to_fp32 would unpickle it with weights_only=False
    assert not marker.exists()


def test_a_deepspeed_directory_without_partition_files_is_refused(tmp_path: Path) -> None:
    path = deepspeed_directory(tmp_path / "ds", {})
    for file in (path / ds_io.TAG).glob("*.pt"):
        file.unlink()
    refused(lambda p: ds_io.check_partitions(p, ds_io.TAG), path, "has no partition files")
