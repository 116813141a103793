"""`torchloom consolidate CHECKPOINT_DIR OUTPUT_FILE`: the CLI face of torchloom.core.checkpoint.consolidate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.core.test_consolidate import sharded_checkpoint
from torchloom.fabric.cli import build_parser, main, script_strategies


def test_consolidate_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = sharded_checkpoint(tmp_path / "ckpt")
    assert main(["consolidate", str(tmp_path / "ckpt"), str(tmp_path / "model.pt")]) == 0
    assert f"Wrote {tmp_path / 'model.pt'}" in capsys.readouterr().out
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["model"]["weight"], model.weight)

    assert main(["consolidate", str(tmp_path / "ckpt"), str(tmp_path / "model.pt")]) == 2
    assert "torchloom consolidate: error: OUTPUT_FILE" in capsys.readouterr().err
    assert main(["consolidate", "--overwrite", str(tmp_path / "ckpt"), str(tmp_path / "model.pt")]) == 0
    assert main(["consolidate", str(tmp_path), str(tmp_path / "other.pt")]) == 2
    assert "is not a torchloom sharded checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "other.pt").exists()


def test_consolidate_is_listed_and_run_is_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "consolidate" in out and "run" in out
    assert "fsdp" in script_strategies() and "fsdp_cpu_offload" in script_strategies()  # script-launched like ddp


def test_console_script_runs_consolidate(tmp_path: Path) -> None:
    sharded_checkpoint(tmp_path / "ckpt")
    script = Path(sys.executable).with_name("torchloom")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "torchloom.fabric.cli"]
    done = subprocess.run(
        [*command, "consolidate", str(tmp_path / "ckpt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert torch.load(tmp_path / "out.pt", weights_only=True)["epoch"] == 1
