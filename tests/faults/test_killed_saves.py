"""A process SIGKILLed at a random moment while it saves leaves the previous checkpoint loadable, and
``ckpt_path="last"`` picks a complete one: a real kill, not an exception inside ``torch.save``."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.processes import job_env
from torchloom.core.checkpoint import distributed as sharded_io
from torchloom.trainer.checkpoint import _find_last

JOB = Path(__file__).with_name("killed_save_job.py")
KILLS = 4


def run_until_killed(kind: str, out: Path, delay: float) -> int:
    """Starts the job and SIGKILLs the saving process ``delay`` s after its second save finished; returns the
    last step it reported saved."""
    process = subprocess.Popen([sys.executable, str(JOB), kind, str(out)], stdout=subprocess.PIPE, text=True,
                               env=job_env(), start_new_session=True)  # fmt: skip
    assert process.stdout is not None
    reported, saver = -1, -1
    try:
        for line in process.stdout:
            _, step, _, pid = line.split()
            reported, saver = int(step), int(pid)
            if reported == 1:
                break
        assert reported == 1, "the job ended before its second save"
        time.sleep(delay)
        os.kill(saver, signal.SIGKILL)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher's agent, if any
        remainder, _ = process.communicate(timeout=60)
    for line in remainder.splitlines():
        reported = int(line.split()[1])
    return reported


def weights_of(checkpoint: Path, kind: str) -> tuple[int, list[float]]:
    """(step, every distinct weight value) of what is at ``checkpoint``, read without the saving process."""
    if kind == "sharded":
        state = sharded_io.load_sharded(checkpoint, distributed=False)
    else:
        state = torch.load(checkpoint, weights_only=True)
    values = sorted({float(v) for tensor in state["model"].values() for v in tensor.unique()})
    return int(state["step"]), values


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "sharded"])
def test_a_save_killed_at_any_moment_leaves_a_complete_checkpoint(tmp_path: Path, kind: str) -> None:
    draw = random.Random(f"killed-saves-{kind}")
    for trial in range(KILLS):
        out = tmp_path / f"trial{trial}"
        out.mkdir()
        reported = run_until_killed(kind, out, delay=draw.uniform(0.0, 0.4))
        last = _find_last(SimpleNamespace(checkpoint_callbacks=[SimpleNamespace(last_model_path="", dirpath=out)]))  # type: ignore[arg-type]
        assert last == str(out / "last.ckpt"), sorted(os.listdir(out))
        step, values = weights_of(Path(last), kind)
        # the newest finished save, or the one that finished just before the kill, before its line was printed
        assert step in (reported, reported + 1) and values == [float(step)], (trial, reported, step, values)
