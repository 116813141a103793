"""Preemption: SIGTERM (or SLURM's warning signal) saves a checkpoint at the next step and ends training cleanly;
``fit(ckpt_path="last")`` (or ``fabric.load``) then finishes with the weights of a run that was never stopped."""

from __future__ import annotations

import itertools
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.processes import explain, job_env, run_python
from torchloom.core.environments import find_free_port
from torchloom.core.errors import ConfigurationError
from torchloom.core.preemption import PreemptionWatch, RequeueError
from torchloom.trainer import LoomModule, Trainer
from torchloom.trainer.callbacks import PreemptionCheckpoint

JOB = Path(__file__).with_name("preemption_job.py")
QUIET: dict[str, Any] = {
    "accelerator": "cpu",
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "max_epochs": 2,
}


def loader() -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4, shuffle=True)


class Net(LoomModule):
    """Dropout, shuffled data and momentum, so a resume that is off by a batch or a random draw shows.

    At global step ``signal_at`` (on ``signal_rank``, -1: every rank) it sends itself ``signal_name``;
    ``step_seconds`` slows each step so a signal from outside lands mid-training; ``marker`` is a file
    written at global step 3, to tell a test that training runs."""

    def __init__(
        self,
        signal_at: int = -1,
        signal_name: str = "SIGTERM",
        signal_rank: int = -1,
        step_seconds: float = 0.0,
        marker: str = "",
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))
        self.signal_at, self.signal_name, self.signal_rank = signal_at, signal_name, signal_rank
        self.step_seconds, self.marker = step_seconds, marker
        self.handler_seen: Any = None

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        step, rank = self.trainer.global_step, self.trainer.global_rank
        self.handler_seen = signal.getsignal(signal.SIGTERM)
        if step == self.signal_at and self.signal_rank in (-1, rank):
            os.kill(os.getpid(), signal.Signals[self.signal_name])
        if self.marker and step == 3:
            Path(self.marker).touch()
        time.sleep(self.step_seconds)
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


def every_step() -> PreemptionCheckpoint:
    """The ranks agree at every step (the default adapts to the step time), so a test knows the stopping step."""
    return PreemptionCheckpoint(check_every_n_steps=1)


def assert_same_weights(mine: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert mine.keys() == reference.keys()
    for key in mine:
        assert torch.equal(mine[key], reference[key]), key


def reference_weights(root: Path) -> dict[str, torch.Tensor]:
    module = Net()
    Trainer(default_root_dir=root, **QUIET).fit(module, loader())
    return module.state_dict()


def test_sigterm_saves_at_the_step_and_last_resumes_exactly(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    module = Net(signal_at=20)
    trainer = Trainer(default_root_dir=tmp_path / "run", callbacks=[every_step()], **QUIET)
    trainer.fit(module, loader())
    assert trainer.state.preempted and trainer.global_step == 21  # the step that got the signal, then stop
    assert module.handler_seen != before and signal.getsignal(signal.SIGTERM) == before  # installed, then restored
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 21 and saved["loops"]["fit"]["batches_done"] == 5  # mid-epoch 1

    resumed = Net()
    again = Trainer(default_root_dir=tmp_path / "run", **QUIET)
    again.fit(resumed, loader(), ckpt_path="last")
    assert not again.state.preempted and again.global_step == 32
    assert_same_weights(resumed.state_dict(), reference_weights(tmp_path / "reference"))


class ValidatedNet(Net):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))


def val_loader() -> DataLoader[Any]:
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)


@pytest.mark.parametrize(("signal_at", "batches_done"), [(15, 16), (7, 8)])  # validation after 16 or 8, 16
def test_a_validation_due_at_the_stopping_step_runs_before_fit_ends(
    tmp_path: Path, signal_at: int, batches_done: int
) -> None:
    """Saved right after the step (in case validation outlasts the grace period), then again after the validation
    due at that step; the resumed run therefore matches, validation's random draws included."""
    kwargs = {**QUIET, "val_check_interval": 1.0 if batches_done == 16 else 0.5}
    trainer = Trainer(default_root_dir=tmp_path / "run", callbacks=[every_step()], **kwargs)
    trainer.fit(ValidatedNet(signal_at=signal_at), loader(), val_loader())
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert trainer.state.preempted and saved["loops"]["fit"]["batches_done"] == batches_done
    assert not saved["loops"]["fit"]["epoch_finished"]
    resumed = ValidatedNet()
    Trainer(default_root_dir=tmp_path / "run", **kwargs).fit(resumed, loader(), val_loader(), ckpt_path="last")
    reference = ValidatedNet()
    Trainer(default_root_dir=tmp_path / "reference", **kwargs).fit(reference, loader(), val_loader())
    assert_same_weights(resumed.state_dict(), reference.state_dict())


def test_min_epochs_does_not_keep_a_preempted_fit_going(tmp_path: Path) -> None:
    trainer = Trainer(default_root_dir=tmp_path / "run", callbacks=[every_step()], **{**QUIET, "min_epochs": 2})
    trainer.fit(Net(signal_at=4), loader())
    assert trainer.state.preempted and trainer.global_step == 5
    resumed = Net()
    Trainer(default_root_dir=tmp_path / "run", **{**QUIET, "min_epochs": 2}).fit(resumed, loader(), ckpt_path="last")
    assert_same_weights(resumed.state_dict(), reference_weights(tmp_path / "reference"))


def test_no_signals_installs_nothing(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    module = Net()
    Trainer(default_root_dir=tmp_path, callbacks=[PreemptionCheckpoint(signals=[])], **QUIET).fit(module, loader())
    assert module.handler_seen == before


def fake_scontrol(folder: Path, exit_code: int = 0) -> Path:
    """An ``scontrol`` that appends its arguments to ``folder/scontrol.log``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{folder}/scontrol.log"\necho refused >&2\nexit {exit_code}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder / "scontrol.log"


@pytest.mark.parametrize(
    ("sent", "requeue", "requeued"), [("SIGUSR1", None, True), ("SIGTERM", None, False), ("SIGUSR1", False, False)]
)
def test_slurm_requeues_after_its_warning_signal_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sent: str, requeue: bool | None, requeued: bool
) -> None:
    """``--signal=USR1@90`` warns before the time limit: save and requeue. SIGTERM may be ``scancel``: no requeue.
    ``requeue=False`` saves and stops without requeueing."""
    log = fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    trainer = Trainer(default_root_dir=tmp_path, callbacks=[PreemptionCheckpoint(requeue=requeue)], **QUIET)
    trainer.fit(Net(signal_at=3, signal_name=sent), loader())
    assert trainer.state.preempted and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (log.read_text() if log.exists() else "") == ("requeue 4242\n" if requeued else "")


def test_a_failed_requeue_says_the_checkpoint_is_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_scontrol(tmp_path / "bin", exit_code=1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # the fake only: sh is found by its #! line
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    with pytest.raises(RequeueError, match=r"'scontrol requeue 70_3' failed with exit code 1: refused The checkpoint"):
        Trainer(default_root_dir=tmp_path, **QUIET).fit(Net(signal_at=2, signal_name="SIGUSR1"), loader())
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(RequeueError, match="'scontrol' is not on PATH"):
        Trainer(default_root_dir=tmp_path, **QUIET).fit(Net(signal_at=2, signal_name="SIGUSR1"), loader())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"signals": ["SIGKILL"]}, r"'SIGKILL' is not valid. Valid: signal names such as 'SIGTERM'"),
     ({"signals": "SIGNOPE"}, r"'SIGNOPE' is not valid"),
     ({"signals": [signal.SIGSTOP]}, r"SIGSTOP.* is not valid.*cannot be caught"),
     ({"signals": 3.5}, r"signals=3.5\) is not valid"),
     ({"signals": [True]}, r"True is not valid"),
     ({"check_every_n_steps": 0}, r"check_every_n_steps=0\) is not valid. Valid: an int >= 1"),
     ({"requeue": "yes"}, r"requeue='yes'\) is not valid. Valid: True, False or None")],
)  # fmt: skip
def test_bad_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        PreemptionCheckpoint(**kwargs)


def test_by_default_the_check_adapts_to_about_once_a_second() -> None:
    """Steps of >= 10 ms: the agreed interval grows (at most doubling) towards 1 s / step time, i.e. <= 100 steps,
    and a signal is acted on at the first check after it."""
    watch = PreemptionWatch(Trainer(accelerator="cpu").strategy)
    intervals = []
    with watch:
        for call in range(1, 1000):
            time.sleep(0.01)
            if call == 300:
                os.kill(os.getpid(), signal.SIGTERM)
            if watch.requested():
                break
            intervals.append(watch.check_interval)
    agreed = [interval for interval, _ in itertools.groupby(intervals)]
    assert agreed[:4] == [1, 2, 4, 8] and 8 < max(agreed) <= 100, agreed
    assert 300 <= call <= 300 + intervals[-1] and watch.signal == signal.SIGTERM


def test_signal_names_numbers_and_members_are_accepted() -> None:
    watch = PreemptionWatch(Trainer(accelerator="cpu").strategy, signals=["term", 10, signal.SIGTERM, "SIGINT"])
    assert watch.signals == (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def test_without_a_model_checkpoint_a_folder_is_needed(tmp_path: Path) -> None:
    trainer = Trainer(
        default_root_dir=tmp_path, enable_checkpointing=False, callbacks=[PreemptionCheckpoint()], **QUIET
    )
    with pytest.raises(ConfigurationError, match=r"there is no ModelCheckpoint. Valid: enable_checkpointing=True"):
        trainer.fit(Net(), loader())
    with pytest.raises(ConfigurationError, match=r"dirpath=3\) is not valid"):
        PreemptionCheckpoint(dirpath=3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- two DDP ranks, as subprocesses


def results(out: Path, phase: str) -> list[dict[str, Any]]:
    return [json.loads((out / f"{phase}-rank{rank}.json").read_text()) for rank in (0, 1)]


def weights(out: Path, phase: str) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = torch.load(out / f"{phase}.pt", weights_only=True)
    return loaded


def run_as_srun_tasks(
    out: Path, *args: str, env: dict[str, str], timeout: float
) -> list[subprocess.CompletedProcess[str]]:
    """Starts the job twice with the variables ``srun --ntasks-per-node=2`` gives its tasks (one step of job 9001)."""
    port = str(find_free_port())
    processes = []
    for rank in (0, 1):
        task = {"SLURM_NTASKS": "2", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0"}
        task.update(SLURM_STEP_ID="0", SLURM_JOB_ID="9001", SLURM_JOB_NAME="train", SLURM_NTASKS_PER_NODE="2")
        task.update(SLURM_NNODES="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        command = [sys.executable, str(JOB), *args, str(out)]
        processes.append(
            subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**env, **task},
                start_new_session=True,
            )
        )  # fmt: skip
    finished = []
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            finished.append(subprocess.CompletedProcess(process.args, process.returncode, output, ""))
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
    return finished


@pytest.mark.slow
def test_two_srun_tasks_stop_together_when_one_gets_slurms_warning_and_resume_exactly(tmp_path: Path) -> None:
    """Two srun tasks (SLURMEnvironment); only rank 1 receives SIGUSR1 (``--signal=USR1@90``): both save at the same
    step and exit 0, rank 0 (which got no signal) requeues the job once, and fit(ckpt_path="last") ends on the
    weights of a run that was never stopped."""
    log = fake_scontrol(tmp_path / "bin")
    env = job_env(PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    tasks = run_as_srun_tasks(tmp_path, "trainer-self", env=env, timeout=240)
    assert [task.returncode for task in tasks] == [0, 0], "\n".join(explain(task) for task in tasks)
    first_run = results(tmp_path, "first")  # checks at steps 1, 2, 4, then 1-4 steps on: the signal came in step 6
    assert first_run[0]["preempted"] and first_run[0]["global_step"] in (6, 7, 8), first_run
    assert [(r["preempted"], r["global_step"]) for r in first_run[1:]] == [(True, first_run[0]["global_step"])]
    assert log.read_text() == "requeue 9001\n"
    assert [(r["preempted"], r["global_step"]) for r in results(tmp_path, "resumed")] == [(False, 16), (False, 16)]
    assert_same_weights(weights(tmp_path, "resumed"), weights(tmp_path, "reference"))
    first, reference = weights(tmp_path, "first"), weights(tmp_path, "reference")
    assert not all(torch.equal(first[key], reference[key]) for key in first)


def sigterm_when_training(mode: str, out: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """Runs the job; once its workers train, SIGTERM goes to the launching process. Returns it and the seconds
    from the signal to its exit."""
    command = [sys.executable, str(JOB), mode, str(out)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=job_env(), start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "training").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        sent = time.monotonic()
        training = (out / "training").exists()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    finished = subprocess.CompletedProcess(command, process.returncode, output, "")
    assert training, f"the job never started training\n{explain(finished)}"
    return finished, time.monotonic() - sent


@pytest.mark.slow
def test_sigterm_to_the_elastic_agent_reaches_the_workers_which_save_and_stop(tmp_path: Path) -> None:
    """strategy='ddp': the agent sends SIGTERM on to its workers and gives them ``termination_timeout`` (10 s)
    before SIGKILL. Both save at the same step and end fit; the agent says what it did and exits 128 + 15, the
    status of a process ended by SIGTERM (no traceback)."""
    process, seconds = sigterm_when_training("trainer-wait", tmp_path)
    first = results(tmp_path, "first")
    assert all(r["preempted"] for r in first) and first[0]["global_step"] == first[1]["global_step"], explain(process)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == first[0]["global_step"] and 3 <= saved["global_step"] < 16
    assert "PreemptionCheckpoint: SIGTERM received" in process.stdout and seconds < 30, explain(process)
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in process.stdout, explain(process)
    assert "the launcher received SIGTERM and passed it on to the workers, which had 10 s" in process.stdout


@pytest.mark.slow
def test_sigterm_to_the_spawn_parent_is_forwarded_and_fit_returns_preempted(tmp_path: Path) -> None:
    """strategy='ddp_spawn': the parent forwards SIGTERM to its workers and waits; fit returns in the parent with
    trainer.state.preempted set, and the parent exits 0."""
    process, seconds = sigterm_when_training("spawn-wait", tmp_path)
    assert process.returncode == 0, explain(process)
    parent = json.loads((tmp_path / "parent.json").read_text())
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert parent["preempted"] and saved["global_step"] == parent["global_step"] and saved["global_step"] < 16
    assert seconds < 30, explain(process)  # no hang: measured 3-4 s


@pytest.mark.slow
def test_fabric_loop_with_preemption_saves_and_resumes_exactly(tmp_path: Path) -> None:
    """Rank 1 alone gets SIGTERM in step 6: both ranks leave the loop at the next check with one save; loading it
    and running on ends on the weights of a loop that was never stopped."""
    process = run_python(JOB, "fabric", str(tmp_path), timeout=240)
    assert process.returncode == 0, explain(process)
    first_run = results(tmp_path, "first")  # checks at steps 1, 2, 4, then 1-4 steps on: the signal came in step 6
    assert first_run[0]["stopped"] and first_run[0]["step"] in (6, 7, 8), first_run
    assert [(r["stopped"], r["step"]) for r in first_run[1:]] == [(True, first_run[0]["step"])]
    assert [(r["stopped"], r["step"]) for r in results(tmp_path, "resumed")] == [(False, 24), (False, 24)]
    assert_same_weights(weights(tmp_path, "resumed"), weights(tmp_path, "reference"))
