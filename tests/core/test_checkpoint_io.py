"""TorchCheckpointIO: atomic whole-file saves and safe loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from torchloom.core.checkpoint import TorchCheckpointIO
from torchloom.core.errors import CheckpointError


class NotATensor:
    """A pickled class: a weights-only load must refuse it."""

    def __init__(self) -> None:
        self.value = 3


def test_round_trip_keeps_tensors_and_plain_values(tmp_path: Path) -> None:
    io = TorchCheckpointIO()
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7, "nested": {"lr": [0.1, 0.01]}}
    io.save_checkpoint(state, tmp_path / "sub" / "ckpt.pt")
    loaded = io.load_checkpoint(tmp_path / "sub" / "ckpt.pt")
    assert torch.equal(loaded["w"], state["w"])
    assert loaded["step"] == 7
    assert loaded["nested"] == {"lr": [0.1, 0.01]}


def test_crash_during_save_keeps_previous_checkpoint_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = TorchCheckpointIO()
    target = tmp_path / "ckpt.pt"
    io.save_checkpoint({"version": 1}, target)

    real_save = torch.save

    def save_half_then_crash(obj: object, f: object, *args: object, **kwargs: object) -> None:
        real_save(obj, f)  # bytes reach the temp file ...
        raise OSError("disk full")  # ... then the writer dies before the rename

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"version": 2}, target)

    assert io.load_checkpoint(target) == {"version": 1}
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_load_is_weights_only_by_default(tmp_path: Path) -> None:
    io = TorchCheckpointIO()
    io.save_checkpoint({"obj": NotATensor()}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"NotATensor.*Nothing in the file was executed.*weights_only=False"):
        io.load_checkpoint(tmp_path / "ckpt.pt")
    assert io.load_checkpoint(tmp_path / "ckpt.pt", weights_only=False)["obj"].value == 3


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing-here\.pt"):
        TorchCheckpointIO().load_checkpoint(tmp_path / "nothing-here.pt")


def test_remove_checkpoint_handles_files_and_folders(tmp_path: Path) -> None:
    io = TorchCheckpointIO()
    io.save_checkpoint({}, tmp_path / "a.pt")
    (tmp_path / "sharded").mkdir()
    (tmp_path / "sharded" / "part").write_text("x")
    io.remove_checkpoint(tmp_path / "a.pt")
    io.remove_checkpoint(tmp_path / "sharded")
    io.remove_checkpoint(tmp_path / "never-existed")
    assert list(tmp_path.iterdir()) == []
