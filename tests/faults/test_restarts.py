"""Restarts: `torchloom run --max-restarts N` and SubprocessScriptLauncher(max_restarts=N) start failed workers again
through torch's elastic agent, and a restarted Trainer.fit resumes from its last checkpoint by itself."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.faults.commands import run_command, torchloom_command
from torchloom.core.environments.local import LocalEnvironment
from torchloom.core.errors import ConfigurationError
from torchloom.core.launchers import SubprocessScriptLauncher
from torchloom.fabric.cli import build_parser, main, plan_run
from torchloom.trainer import LoomModule, Trainer
from torchloom.trainer.callbacks import ModelCheckpoint

HERE = Path(__file__).parent
CLI_TIMEOUT = 240  # seconds for a CLI job of two attempts; ~20 s on an idle 2-core machine
RUN = ["run", "--accelerator", "cpu", "--devices", "2"]


# --------------------------------------------------------------- options (no processes)


def test_max_restarts_reaches_torchrun_and_defaults_to_zero() -> None:
    from torch.distributed.run import get_args_parser

    script = str(HERE / "restart_job.py")
    for argv, expected in (([script], 0), (["--max-restarts", "3", script], 3)):
        plan = plan_run(build_parser().parse_args([*RUN, *argv]))
        assert get_args_parser().parse_args(plan.torchrun_args).max_restarts == expected


def test_a_negative_max_restarts_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*RUN, "--max-restarts", "-1", str(HERE / "restart_job.py")]) == 2
    error = capsys.readouterr().err
    assert "--max-restarts -1 is not valid. Valid: an int >= 0" in error


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_the_launcher_refuses_a_bad_max_restarts(value: Any) -> None:
    with pytest.raises(ConfigurationError, match=rf"max_restarts={value!r} is not valid. Valid: an int >= 0"):
        SubprocessScriptLauncher(LocalEnvironment(), 2, max_restarts=value)


# --------------------------------------------------------------- the restart decision, in one process


class Line(LoomModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 1)
        self.start_step = -1

    def on_train_start(self) -> None:
        self.start_step = self.trainer.global_step

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(folder: Path, epochs: int, ckpt_path: str | None = None) -> Line:
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    trainer = Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=folder, save_last=True)])  # fmt: skip
    module = Line()
    trainer.fit(module, DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4), ckpt_path=ckpt_path)
    return module


def test_a_restarted_fit_resumes_from_last_and_an_explicit_path_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fit(tmp_path / "a", epochs=1)  # last.ckpt at step 4
    _fit(tmp_path / "b", epochs=2)  # last.ckpt at step 8
    assert _fit(tmp_path / "a", epochs=3).start_step == 0  # not restarted: a plain fit starts over
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert _fit(tmp_path / "c", epochs=1).start_step == 0
    capsys.readouterr()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert _fit(tmp_path / "b", epochs=3).start_step == 8
    last = tmp_path / "b" / "last.ckpt"
    assert capsys.readouterr().out.count(f"torchloom: restart 2: resuming fit from the last checkpoint {last}") == 1
    explicit = str(tmp_path / "c" / "last.ckpt")  # step 4
    assert _fit(tmp_path / "b", epochs=3, ckpt_path=explicit).start_step == 4
    assert "resuming" not in capsys.readouterr().out
    assert _fit(tmp_path / "empty", epochs=1).start_step == 0
    assert "torchloom: restart 2: no complete checkpoint to resume from; fit starts over." in capsys.readouterr().out


# --------------------------------------------------------------- real jobs


def _starts(folder: Path) -> set[str]:
    return set((folder / "starts.txt").read_text().splitlines())


@pytest.mark.slow
def test_a_crashed_rank_is_restarted_and_the_trainer_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    """Rank 1 raises at step 7 on the first attempt (last.ckpt holds step 6): the second attempt resumes at step 6 and
    ends with the weights of a run that never failed."""
    restarted, reference = tmp_path / "restarted", tmp_path / "reference"
    restarted.mkdir()
    reference.mkdir()
    script = str(HERE / "restart_job.py")
    job = run_command([*torchloom_command(), *RUN, "--max-restarts", "1", script, str(restarted), "7", "raise"],
                      timeout=CLI_TIMEOUT)  # fmt: skip
    assert job.returncode == 0, job.explain()
    assert "RuntimeError: injected crash at step 7 on rank 1" in job.stderr, job.explain()
    last = restarted / "checkpoints" / "last.ckpt"
    assert f"torchloom: restart 1: resuming fit from the last checkpoint {last}" in job.stdout, job.explain()
    expected = {
        f"attempt={attempt} rank={rank} start_step={step}" for attempt, step in ((0, 0), (1, 6)) for rank in (0, 1)
    }
    assert _starts(restarted) == expected, job.explain()
    clean = run_command([*torchloom_command(), *RUN, script, str(reference), "-1", "raise"], timeout=CLI_TIMEOUT)
    assert clean.returncode == 0, clean.explain()
    assert _starts(reference) == {"attempt=0 rank=0 start_step=0", "attempt=0 rank=1 start_step=0"}
    weights, expected_weights = torch.load(restarted / "final.pt"), torch.load(reference / "final.pt")
    assert weights.keys() == expected_weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, expected_weights[name]), name


@pytest.mark.slow
def test_a_restart_finds_the_checkpoint_of_the_failed_attempts_run_folder(tmp_path: Path) -> None:
    """With the default logger each attempt logs to a new version_N folder, where the default ModelCheckpoint saves:
    the restarted attempt still resumes from the failed attempt's last.ckpt (its folder was kept in the agent's store)."""
    script = str(HERE / "restart_job.py")
    job = run_command(
        [*torchloom_command(), *RUN, "--max-restarts", "1", script, str(tmp_path), "7", "raise", "default"],
        timeout=CLI_TIMEOUT,
    )
    assert job.returncode == 0, job.explain()
    last = tmp_path / "torchloom_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"torchloom: restart 1: resuming fit from the last checkpoint {last}" in job.stdout, job.explain()
    assert "attempt=1 rank=0 start_step=6" in _starts(tmp_path), job.explain()
    assert (tmp_path / "torchloom_logs" / "version_1" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_without_restarts_the_job_fails_with_the_workers_status(tmp_path: Path) -> None:
    script = str(HERE / "restart_job.py")
    job = run_command([*torchloom_command(), *RUN, "--max-restarts", "0", script, str(tmp_path), "7", "exit"],
                      timeout=CLI_TIMEOUT)  # fmt: skip
    assert job.returncode == 3, job.explain()
    error = job.stderr[job.stderr.index("torchloom run: error: ") :]
    assert error.startswith("torchloom run: error: Worker with global rank 1 (local rank 1, pid "), job.explain()
    assert "exited with code 3." in error and "rank 0 (pid " in error, job.explain()
    assert _starts(tmp_path) == {"attempt=0 rank=0 start_step=0", "attempt=0 rank=1 start_step=0"}


@pytest.mark.slow
@pytest.mark.parametrize("max_restarts", [1, 0])
def test_the_popen_launcher_restarts_failed_workers(tmp_path: Path, max_restarts: int) -> None:
    job = run_command([sys.executable, str(HERE / "popen_restart_job.py"), str(tmp_path), str(max_restarts)],
                      timeout=120)  # fmt: skip
    finished = {path.name for path in tmp_path.iterdir()}
    if max_restarts:
        assert job.returncode == 0, job.explain()
        assert {"attempt1-rank0", "attempt1-rank1"} <= finished, job.explain()
    else:
        assert job.returncode != 0, job.explain()
        assert "WorkerFailedError: Worker with global rank 1 " in job.stderr and "exited with code 3" in job.stderr
        assert not any(name.startswith("attempt1") for name in finished), job.explain()
