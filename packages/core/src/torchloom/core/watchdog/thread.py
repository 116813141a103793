"""The watchdog thread: publishes this rank's progress to the job's store and ends a stalled job's rank."""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from torchloom.core.watchdog.marks import progress
from torchloom.core.watchdog.stall import STALL_EXIT_CODE, Heartbeat, StallError, describe_stall, find_stall

__all__ = ["StallWatchdog", "watch_default_group"]

_MAX_INTERVAL_S = 5.0
_STORE_TIMEOUT_S = 10.0  # one heartbeat read or write; the thread gives up watching past it
_KEY = "torchloom/watchdog/rank{}"


class StallWatchdog:
    """Publishes this rank's progress to ``store`` and, once the rank has not moved for ``stall_timeout``, checks
    every rank's; ``on_stall`` gets the message when it finds a stall (default: print it, the main thread's stack,
    and end the process with ``STALL_EXIT_CODE``). ``store`` must be this thread's own (``Store.clone()``)."""

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        stall_timeout: datetime.timedelta,
        on_stall: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.stall_timeout = stall_timeout
        self.interval = min(_MAX_INTERVAL_S, stall_timeout.total_seconds() / 4)
        self.on_stall = on_stall or _report_and_exit
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torchloom-stall-watchdog", daemon=True)

    def start(self) -> StallWatchdog:
        self._publish()  # before the first wait: a peer that checks early finds this rank
        self._thread.start()
        atexit.register(self.stop)  # a product that never tears down: its exit is no stall either
        return self

    def stop(self) -> None:
        """Ends the thread and tells the others this rank left on purpose (a store already gone is no error)."""
        atexit.unregister(self.stop)
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=_STORE_TIMEOUT_S + self.interval)  # a daemon: never holds up the exit
        try:
            self._publish(done=True)
        except Exception:  # the store's host may have ended first; nobody is left to tell
            pass

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _publish(self, done: bool = False) -> None:
        calls, label, inside, moved = progress.snapshot()
        now, clock = time.time(), time.monotonic()
        beat = Heartbeat(calls, label, inside, moved=now - (clock - moved), beat=now, done=done)
        self.store.set(_KEY.format(self.rank), beat.encode())

    def read(self) -> dict[int, Heartbeat | None]:
        """Every rank's latest heartbeat (``None`` for a rank that has published none)."""
        keys = [_KEY.format(r) for r in range(self.world_size)]
        present = list(range(self.world_size))
        if not self.store.check(keys):  # a get of a missing key would wait for the store's timeout
            present = [r for r in present if self.store.check([keys[r]])]
        raw = self.store.multi_get([keys[r] for r in present]) if present else []
        beats: dict[int, Heartbeat | None] = dict.fromkeys(range(self.world_size))
        beats.update({r: Heartbeat.decode(value) for r, value in zip(present, raw)})
        return beats

    def _run(self) -> None:
        limit = self.stall_timeout.total_seconds()
        backoff, next_check = self.interval, 0.0
        grace_until: float | None = None  # a waiting rank lets a late one report first: the launcher shows its stack
        try:
            while not self._stopping.wait(self.interval):
                self._publish()
                clock = time.monotonic()
                if clock - progress.moved < limit:
                    backoff, next_check, grace_until = self.interval, 0.0, None
                    continue
                if clock < next_check:
                    continue
                beats, now = self.read(), time.time()
                stall = find_stall(beats, now, self.stall_timeout)
                if stall is None:  # all ranks idle alike (a long evaluation): check less often, not to flood the store
                    next_check, backoff, grace_until = clock + backoff, min(2 * backoff, limit), None
                    continue
                if self.rank not in stall.late:
                    grace_until = grace_until or clock + 2 * self.interval
                    if clock < grace_until:
                        continue
                if not self._stopping.is_set():
                    self.on_stall(describe_stall(stall, beats, now, self.rank))
                return
        except Exception:  # the store went away (a peer's host ended the job): nothing left to watch
            return


def watch_default_group(stall_timeout: datetime.timedelta) -> StallWatchdog | None:
    """A started watchdog for this process's default process group, on its own client of the group's store.

    ``None`` (with a warning) when the group has no store to share: MPI's runtime meets without one.
    """
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    default: Any = _get_default_store()  # torch's stubs lack Store.clone
    try:
        store = default.clone()  # the main thread's store may be busy: a clone is this thread's own connection
    except (AttributeError, RuntimeError) as error:
        warnings.warn(f"The stall watchdog is off: the process group's store cannot be shared ({error}).", stacklevel=2)
        return None
    store.set_timeout(datetime.timedelta(seconds=_STORE_TIMEOUT_S))
    return StallWatchdog(store, dist.get_rank(), dist.get_world_size(), stall_timeout).start()


def _main_thread_stack() -> str:
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    if frame is None:
        return "(the main thread has ended)"
    return "".join(traceback.format_stack(frame))


def _report_and_exit(message: str) -> None:
    """Prints ``message`` and the main thread's stack, records them for the launcher, and ends the process."""
    report = f"{message}\nMain thread of this rank (pid {os.getpid()}), most recent call last:\n{_main_thread_stack()}"
    sys.stderr.write(report + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # the launcher shows the first failed worker's error file
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        try:
            raise StallError(report)
        except StallError as error:
            get_error_handler().record_exception(error)
    os._exit(STALL_EXIT_CODE)  # the main thread is blocked in C++: an exception here could never reach it
