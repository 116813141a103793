"""Failure matrix: rank 1 of a real 2-rank DDP job on the CPU fails at a point of training, under each launcher, in
each product. The whole job must end within FAILURE_DEADLINE_S of the failure with a non-zero exit code, and show the
failing rank's error first: its traceback (``raise``) or the launcher naming it (``kill``).

Points: setup, forward, backward (inside autograd), a collective (rank 0 is in it), a checkpoint save (while the
state is collected), validation. Launchers: ``popen`` (strategy "ddp": the script re-runs itself as the workers),
``spawn`` (strategy "ddp_spawn"), ``torchrun`` (an external ``python -m torch.distributed.run``). Products: Fabric
(the user's loop) and the Trainer (a LoomModule). ``raise`` runs the full matrix; ``kill`` (SIGKILL) a covering
subset: every point, each launcher and product at least twice. The job is ``failure_job.py``.

Each case is its own job, but the jobs of the selected cases run ``PARALLEL_JOBS`` at a time from the first test on
(most of a job is Python and torch starting up), each test then checking its own job's result.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.faults.commands import Finished, run_command
from tests.faults.failure_job import POINTS

JOB = Path(__file__).with_name("failure_job.py")
FAILURE_DEADLINE_S = 30.0  # from the failure to the end of the whole job
JOB_TIMEOUT_S = 180.0  # a job that runs past this is a hang (a healthy failing job ends in ~10 s here)
PARALLEL_JOBS = 3
LAUNCHERS = ("popen", "spawn", "torchrun")
PRODUCTS = ("fabric", "trainer")


class Case(NamedTuple):
    product: str
    launcher: str
    point: str
    mode: str

    @property
    def id(self) -> str:
        return "-".join(self)


RAISE_CASES = [Case(p, launcher, point, "raise") for p in PRODUCTS for launcher in LAUNCHERS for point in POINTS]
KILL_CASES = [
    Case("fabric", "popen", "setup", "kill"),
    Case("trainer", "spawn", "forward", "kill"),
    Case("fabric", "torchrun", "backward", "kill"),
    Case("trainer", "popen", "collective", "kill"),
    Case("fabric", "spawn", "checkpoint", "kill"),
    Case("trainer", "torchrun", "validation", "kill"),
]
CASES = RAISE_CASES + KILL_CASES

# a worker in torch elastic's failure summary: its time (whole seconds), rank and exit code
TORCH_FAILURE = re.compile(r"time\s*: (\S+)\s+host\s*: \S+\s+rank\s*: (\d+) \(local_rank: \d+\)\s+exitcode\s*: (-?\d+)")
# an exception's last line, as Python prints it (torch's elastic workers prefix their output with "[rankN]: ")
EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[A-Za-z_][\w.]*)?(?:Error|Exception)): (.*)$", re.MULTILINE)


def _command(case: Case, folder: Path) -> list[str]:
    job = [str(JOB), case.product, case.point, case.mode, case.launcher, str(folder)]
    if case.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *job]
    return [sys.executable, *job]


class Jobs:
    """Runs the selected cases' jobs in the background, ``PARALLEL_JOBS`` at a time, in the tests' order."""

    def __init__(self, cases: list[Case], root: Path) -> None:
        self._pool = ThreadPoolExecutor(PARALLEL_JOBS)
        self._root = root
        self._lock = threading.Lock()
        self._futures: dict[Case, Future[tuple[Finished, float]]] = {}
        for case in cases:
            self._submit(case)

    def _submit(self, case: Case) -> Future[tuple[Finished, float]]:
        with self._lock:
            if case not in self._futures:
                self._futures[case] = self._pool.submit(self._run, case)
            return self._futures[case]

    def _run(self, case: Case) -> tuple[Finished, float]:
        folder = self._root / case.id
        folder.mkdir()
        start = time.monotonic()
        finished = run_command(_command(case, folder), timeout=JOB_TIMEOUT_S, merge_output=True)
        return finished, time.monotonic() - start

    def result(self, case: Case) -> tuple[Finished, float]:
        return self._submit(case).result()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="module")
def jobs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> object:
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_a_failing_rank_ends_the_job_and_is_shown_first"
    ]
    pool = Jobs(selected, tmp_path_factory.mktemp("failure_matrix"))
    yield pool
    pool.close()


def _injected_at(output: str) -> float:
    found = re.search(r"^INJECT (\d+\.\d+)$", output, re.MULTILINE)
    assert found, "rank 1 never reached the failure point"
    return float(found.group(1))


def _check_raise_shown_first(case: Case, output: str) -> None:
    injected = f"injected failure at {case.point} on rank 1"
    errors = [
        match
        for match in EXCEPTION_LINE.finditer(output)
        # the launcher's summary naming rank 1 (its traceback follows) is rank 1's error too
        if not (match.group(1).endswith("WorkerFailedError") and "Worker with global rank 1 " in match.group(2))
    ]
    assert errors, "no exception in the output"
    first = errors[0]
    assert first.group(2) == injected, f"the first error shown is not rank 1's: {first.group(0)!r}"


def _check_kill_named(case: Case, output: str) -> None:
    if case.launcher == "torchrun":  # torch's own summary of the failed workers, which torchloom does not order
        report = output[output.rindex("Failures:") :]
        failures = TORCH_FAILURE.findall(report)  # (time, rank, exitcode): the other failures, then the root cause
        killed = [time for time, rank, exitcode in failures if (rank, exitcode) == ("1", "-9")]
        assert killed, report[:1500]
        root_time, root_rank, _ = failures[-1]
        # torch names the failure with the earliest whole-second stamp: a peer's error (a closed connection) in the
        # same second as the kill can be named first; one in a later second never
        assert root_rank == "1" or root_time == killed[0], report[:1500]
    else:
        assert re.search(r"WorkerFailedError: Worker with global rank 1 \(.*\) was killed by signal SIGKILL", output)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_failing_rank_ends_the_job_and_is_shown_first(case: Case, jobs: Jobs) -> None:
    finished, elapsed = jobs.result(case)
    output = finished.stdout
    explain = f"{case.id}: {finished.explain()}"
    assert finished.returncode != 0, explain
    assert "JOB ENDED WITHOUT FAILING" not in output, explain
    took = finished.ended_at - _injected_at(output)
    print(f"{case.id}: the job took {elapsed:.1f} s and ended {took:.1f} s after the failure")  # shown by pytest -rP
    assert took < FAILURE_DEADLINE_S, f"the job ended {took:.1f} s after the failure\n{explain}"
    if case.launcher != "torchrun":  # our launchers: WorkerFailedError naming rank 1 (spawn: raised in the parent)
        assert "WorkerFailedError: Worker with global rank 1 " in output, explain
    if case.mode == "raise":
        _check_raise_shown_first(case, output)
    else:
        _check_kill_named(case, output)


def test_the_matrix_covers_every_point_launcher_and_product() -> None:
    assert {case.point for case in KILL_CASES} == set(POINTS)
    for values, field in ((LAUNCHERS, "launcher"), (PRODUCTS, "product")):
        for value in values:
            assert sum(getattr(case, field) == value for case in KILL_CASES) >= 2
    assert len(RAISE_CASES) == len(POINTS) * len(LAUNCHERS) * len(PRODUCTS) == 36


def test_a_job_whose_rank_does_not_fail_succeeds(tmp_path: Path) -> None:
    """The control: the same job with no failure point runs to its end, so the failures above are the injected ones."""
    job = run_command([sys.executable, str(JOB), "fabric", "none", "raise", "spawn", str(tmp_path)], JOB_TIMEOUT_S)
    assert job.returncode == 0 and "JOB ENDED WITHOUT FAILING" in job.stdout, job.explain()
