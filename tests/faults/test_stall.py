"""The stall watchdog (issue 8): a rank that stops reaching the strategy's calls is named by its peers, with where
they wait, well before the process-group timeout; ranks that are all slow alike are left alone.

The decision is tested on made-up heartbeats; the thread on a real store in this process; the whole path on real
2-rank DDP jobs (``stall_job.py``, run as subprocesses) through Fabric and the Trainer.
"""

from __future__ import annotations

import datetime
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from torch.distributed import TCPStore

from tests.processes import explain, run_python
from torchloom.core.environments.local import find_free_port
from torchloom.core.errors import ConfigurationError
from torchloom.core.strategies.ddp import DDPStrategy
from torchloom.core.strategies.fsdp import FSDPStrategy
from torchloom.core.strategies.model_parallel import ModelParallelStrategy
from torchloom.core.strategies.parallel import ParallelStrategy
from torchloom.core.watchdog import (
    DEFAULT_STALL_TIMEOUT,
    PATIENT_BARRIERS,
    STALL_EXIT_CODE,
    Heartbeat,
    StallWatchdog,
    describe_stall,
    find_stall,
    progress,
)

JOB = Path(__file__).with_name("stall_job.py")
JOB_DEADLINE_S = 60.0  # launch, 3 steps, 3 s stall timeout and the report, on a busy 2-core machine
TIMEOUT = datetime.timedelta(seconds=10)
NOW = 1_000_000.0


def beat(calls: int, label: str | None = "backward", idle: float = 20.0, age: float = 1.0, **kw: Any) -> Heartbeat:
    """A heartbeat published ``age`` s before ``NOW`` by a rank that last moved ``idle`` s before ``NOW``."""
    return Heartbeat(calls=calls, label=label, inside=kw.pop("inside", True), moved=NOW - idle, beat=NOW - age, **kw)


# ---------------------------------------------------------------- the decision


def test_the_rank_with_fewer_calls_is_named_once_a_peer_waited_the_timeout() -> None:
    beats = {0: beat(8), 1: beat(7, "optimizer_step", inside=False, idle=21), 2: beat(8)}
    stall = find_stall(beats, NOW, TIMEOUT)
    assert stall is not None and stall.late == [1] and stall.waiting == [0, 2] and stall.frozen == []
    message = describe_stall(stall, beats, NOW, rank=0)
    assert "rank(s) [1] did not arrive" in message
    assert "rank 1 did not arrive: it left 'optimizer_step' (call 7) 21 s ago" in message
    assert "ranks [0, 2] arrived and wait; the longest, rank 0, is in 'backward' (call 8) for 20 s" in message


def test_a_large_job_is_described_in_a_few_lines() -> None:
    beats: dict[int, Heartbeat | None] = {r: beat(8, idle=20 + r % 3) for r in range(512)}
    beats[7] = beat(7, "optimizer_step", inside=False)
    stall = find_stall(beats, NOW, TIMEOUT)
    assert stall is not None and stall.late == [7]
    message = describe_stall(stall, beats, NOW, rank=0)
    assert "rank(s) [7] did not arrive" in message and len(message.splitlines()) == 4, message
    assert "ranks [0-6, 8-511] arrived and wait; the longest, rank 2, is in 'backward' (call 8) for 22 s" in message


def test_ranks_slow_alike_are_no_stall() -> None:
    assert find_stall({0: beat(8, idle=600), 1: beat(8, idle=590)}, NOW, TIMEOUT) is None


@pytest.mark.parametrize("barrier", PATIENT_BARRIERS)
def test_ranks_waiting_on_purpose_for_one_ranks_one_off_work_are_no_stall(barrier: str) -> None:
    """Rank 0 downloads data for an hour in prepare_data (or under rank_zero_first) while rank 1 waits."""
    assert find_stall({0: beat(3, label="setup_module", inside=False), 1: beat(4, label=barrier, idle=3600)}, NOW,
                      TIMEOUT) is None  # fmt: skip
    stall = find_stall({0: beat(3), 1: beat(4, label="barrier('save_checkpoint')", idle=3600)}, NOW, TIMEOUT)
    assert stall is not None and stall.late == [0]  # any other sync point is one


def test_no_stall_before_the_waiting_rank_waited_the_timeout() -> None:
    assert find_stall({0: beat(8, idle=9), 1: beat(7, idle=30)}, NOW, TIMEOUT) is None


def test_a_stopped_heartbeat_is_a_frozen_rank_even_at_the_same_call() -> None:
    beats = {0: beat(8), 1: beat(8, age=15)}  # rank 1's process stopped running Python 15 s ago
    stall = find_stall(beats, NOW, TIMEOUT)
    assert stall is not None and stall.late == [1] and stall.frozen == [1] and stall.waiting == [0]
    message = describe_stall(stall, beats, NOW, rank=0)
    assert "rank 1 did not arrive: its heartbeat stopped 15 s ago (process frozen or gone); last heard, it is in " \
        "'backward' (call 8) for 5 s" in message  # fmt: skip


def test_a_missing_heartbeat_is_late_and_a_finished_rank_never_is() -> None:
    stall = find_stall({0: beat(8), 1: None}, NOW, TIMEOUT)
    assert stall is not None and stall.late == [1]
    assert "rank 1 never published a heartbeat" in describe_stall(stall, {0: beat(8), 1: None}, NOW, rank=0)
    finished = beat(5, age=100, done=True)  # it tore down: its peers' collectives fail at once, no stall to name
    assert find_stall({0: beat(8), 1: finished}, NOW, TIMEOUT) is None


# ---------------------------------------------------------------- the marks


def test_marks_count_calls_and_restore_the_stack_after_an_error() -> None:
    class Failing(DDPStrategy):
        def barrier(self, name: str | None = None) -> None:  # an override is marked too
            raise RuntimeError("broken barrier")

    before = progress.calls
    strategy = Failing(stall_timeout=None)
    strategy.all_reduce(1.0)  # no process group: returns its input, still a marked call
    assert (progress.calls, progress.last, progress.stack) == (before + 1, "all_reduce", [])
    with pytest.raises(RuntimeError, match="broken barrier"):
        strategy.barrier("prepare_data")
    assert (progress.calls, progress.last, progress.stack) == (before + 2, "barrier('prepare_data')", [])


def test_a_rank_inside_nested_calls_reports_the_innermost_it_is_in() -> None:
    seen: list[tuple[int, str | None, bool, float]] = []

    class Saving(DDPStrategy):
        def barrier(self, name: str | None = None) -> None:
            seen.append(progress.snapshot())

        def save_checkpoint(self, path: Any, state: Any, filter: Any = None) -> None:
            self.barrier()  # e.g. waits for rank 0's write
            seen.append(progress.snapshot())

    Saving(stall_timeout=None).save_checkpoint("unused", {})
    assert [(label, inside) for _, label, inside, _ in seen] == [("barrier", True), ("save_checkpoint", True)]
    assert seen[1][0] == seen[0][0] and progress.snapshot()[1:3] == ("barrier", False)


# ---------------------------------------------------------------- the thread, on a real store


@pytest.fixture
def store() -> Iterator[Any]:
    server = TCPStore("127.0.0.1", find_free_port(), None, True, datetime.timedelta(seconds=10))
    yield server
    del server


def _peer(store: Any, calls: int, stop: threading.Event, frozen: bool) -> threading.Thread:
    """Rank 1 of the test: a heartbeat at ``calls`` calls, refreshed every 50 ms (``frozen``: published once)."""

    def publish() -> None:
        while not stop.is_set():
            now = time.time()
            peer = Heartbeat(calls=calls, label="barrier", inside=True, moved=now - 1, beat=now)
            store.set("torchloom/watchdog/rank1", peer.encode())
            if frozen:
                return
            stop.wait(0.05)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    return thread


class Blocking(DDPStrategy):
    """A barrier that blocks until ``released`` (at most 4 s), as a collective waits for a peer."""

    def __init__(self, released: threading.Event) -> None:
        super().__init__(stall_timeout=None)
        self.released = released

    def barrier(self, name: str | None = None) -> None:  # marked like any strategy's override
        self.released.wait(4.0)


@pytest.mark.parametrize("peer", ["behind", "level", "frozen"])
def test_the_thread_reports_a_peer_behind_or_frozen_and_not_one_that_is_level(store: Any, peer: str) -> None:
    reports: list[str] = []
    released = threading.Event()
    stop_peer = threading.Event()

    def on_stall(message: str) -> None:
        reports.append(message)
        released.set()

    waiting_call = progress.calls + 1  # the call the main thread is about to block in
    publisher = _peer(store, waiting_call - 1 if peer == "behind" else waiting_call, stop_peer, peer == "frozen")
    watchdog = StallWatchdog(store, 0, 2, datetime.timedelta(seconds=0.4), on_stall=on_stall).start()
    try:
        start = time.monotonic()
        Blocking(released).barrier()
        elapsed = time.monotonic() - start
    finally:
        watchdog.stop()
        stop_peer.set()
        publisher.join()
    assert not watchdog.running
    if peer != "level":
        assert len(reports) == 1 and elapsed < 3.5, reports
        assert "rank(s) [1] did not arrive" in reports[0], reports[0]
        assert f"rank 0 arrived and waits: it is in 'barrier' (call {waiting_call})" in reports[0], reports[0]
        assert ("(process frozen or gone)" in reports[0]) is (peer == "frozen"), reports[0]
    else:
        assert reports == [] and elapsed >= 3.9  # waited out the whole 4 s: level ranks are no stall
    assert Heartbeat.decode(store.get("torchloom/watchdog/rank0")).done  # stop() told the peers it left


def test_stop_is_quiet_when_the_store_is_already_gone() -> None:
    server = TCPStore("127.0.0.1", find_free_port(), None, True, datetime.timedelta(seconds=10))
    client = TCPStore("127.0.0.1", server.port, None, False, datetime.timedelta(seconds=2))
    watchdog = StallWatchdog(client, 0, 2, datetime.timedelta(seconds=0.4)).start()
    del server  # the host ended first
    time.sleep(0.3)
    watchdog.stop()
    assert not watchdog.running


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("cls", [DDPStrategy, FSDPStrategy, ModelParallelStrategy], ids=lambda c: c.__name__)
@pytest.mark.parametrize("value", [0, 3.0, "10m", datetime.timedelta(0), datetime.timedelta(seconds=-1), True])
def test_a_bad_stall_timeout_is_refused_naming_it(cls: type[ParallelStrategy], value: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"stall_timeout=.* is not valid\. Valid: a positive datetime"):
        cls(stall_timeout=value)


def test_stall_timeout_defaults_below_the_process_group_timeout_and_none_turns_it_off() -> None:
    assert DDPStrategy().stall_timeout == DEFAULT_STALL_TIMEOUT < DDPStrategy().timeout
    assert DDPStrategy(stall_timeout=None).stall_timeout is None
    assert FSDPStrategy(stall_timeout=datetime.timedelta(seconds=5)).stall_timeout == datetime.timedelta(seconds=5)


# ---------------------------------------------------------------- real 2-rank jobs


@pytest.mark.slow
@pytest.mark.parametrize("product", ["fabric", "trainer"])
def test_a_rank_that_stalls_is_named_by_the_watchdog(product: str) -> None:
    start = time.monotonic()
    process = run_python(JOB, product, "stall", timeout=150)
    elapsed = time.monotonic() - start
    assert process.returncode != 0 and elapsed < JOB_DEADLINE_S, f"{elapsed:.1f} s\n{explain(process)}"
    error = process.stderr[process.stderr.index("WorkerFailedError: ") :]
    assert f"exited with code {STALL_EXIT_CODE}" in error.splitlines()[0], explain(process)
    assert "torchloom stall watchdog (on rank " in error and "rank(s) [1] did not arrive" in error, explain(process)
    assert "rank 0 arrived and waits: it is in 'backward'" in error, explain(process)
    # rank 1 reports too (it is only asleep): its stack shows the line it is stuck on
    assert "time.sleep(3600)  # the stall" in process.stderr, explain(process)


@pytest.mark.slow
def test_ranks_slow_alike_finish_without_a_false_alarm_and_none_starts_no_watchdog() -> None:
    # both ranks sleep 5 s, past the 3 s stall timeout; then the same workers fit again with stall_timeout=None
    process = run_python(JOB, "trainer", "slow", timeout=150)
    assert process.returncode == 0, explain(process)
    # two workers share the pipe and their lines may interleave: look for each report, not for whole lines
    reports = re.findall(r"(WATCHDOG|DONE) scenario=(\w+) rank=(\d) threads(?:_after)?=(\d+)", process.stdout)
    for rank in "01":  # the watchdog ran, and the Trainer's teardown stopped it
        for report in [("WATCHDOG", "slow", rank, "1"), ("DONE", "slow", rank, "0"), ("WATCHDOG", "off", rank, "0"),
                       ("DONE", "off", rank, "0")]:  # fmt: skip
            assert report in reports, explain(process)
    assert "stall watchdog" not in process.stderr, explain(process)
