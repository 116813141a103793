"""Stall watchdog: a rank that stops reaching the strategy's calls is named, instead of its peers hanging in a
collective until the process-group timeout.

Each rank's main thread marks its progress as it enters and leaves the strategy's steps and collectives (a
counter, the call's name and a clock reading, in memory only). A daemon thread per rank publishes that to the
job's rendezvous store every few seconds. Once this rank has not moved for ``stall_timeout`` it reads every
rank's heartbeat. Ranks that made fewer calls, or whose heartbeat stopped (a frozen process), did not arrive;
when a rank that did arrive has been waiting for ``stall_timeout``, this rank prints who did not arrive, where
the others wait and its own Python stack, and ends the process with ``STALL_EXIT_CODE``: its main thread may be
blocked in a C++ collective, which nothing in Python can interrupt. Ranks that all made the same number of
calls (a uniformly slow step, a long compile) are not a stall and are left alone.

Marks are counted, so they only sit on calls that every rank makes the same number of times (collectives and
the step). Heartbeat ages compare wall clocks of different nodes: they are assumed to agree within seconds.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import json
import os
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torchloom.core.errors import ConfigurationError, TorchloomError

__all__ = [
    "DEFAULT_STALL_TIMEOUT",
    "MARKED_CALLS",
    "PATIENT_BARRIERS",
    "STALL_EXIT_CODE",
    "Heartbeat",
    "Stall",
    "StallError",
    "StallWatchdog",
    "check_stall_timeout",
    "describe_stall",
    "find_stall",
    "mark_calls",
    "progress",
    "watch_default_group",
]

# below the process group's 30-minute default, so the stalled rank is named before the collective times out
DEFAULT_STALL_TIMEOUT = datetime.timedelta(minutes=10)
STALL_EXIT_CODE = 86  # distinct from Python's 1 (exception) and a signal's 128+N, so scripts can tell a stall
# the strategy calls that count as progress: every rank makes each of them the same number of times
MARKED_CALLS = (
    "setup_module",
    "backward",
    "optimizer_step",
    "all_reduce",
    "all_gather",
    "broadcast",
    "barrier",
    "reduce_boolean_decision",
    "save_checkpoint",
    "load_checkpoint",
)
# sync points where the other ranks wait on purpose while one rank does one-off work of any length (downloads in
# the Trainer's prepare_data, Fabric's rank_zero_first): waiting there is no stall; the process-group timeout bounds it
PATIENT_BARRIERS = ("barrier('prepare_data')", "barrier('rank_zero_first')")
_MAX_INTERVAL_S = 5.0
_STORE_TIMEOUT_S = 10.0  # one heartbeat read or write; the thread gives up watching past it
_KEY = "torchloom/watchdog/rank{}"

F = TypeVar("F", bound=Callable[..., Any])


class StallError(TorchloomError, RuntimeError):
    """What the watchdog records for the launcher (the elastic error file) before it ends a stalled job's rank."""


def check_stall_timeout(stall_timeout: object) -> datetime.timedelta | None:
    """``stall_timeout`` if it is a positive ``datetime.timedelta`` or ``None``, else a ``ConfigurationError``."""
    if stall_timeout is None or (
        isinstance(stall_timeout, datetime.timedelta) and stall_timeout > datetime.timedelta(0)
    ):
        return stall_timeout
    raise ConfigurationError(
        f"stall_timeout={stall_timeout!r} is not valid. Valid: a positive datetime.timedelta such as "
        f"datetime.timedelta(minutes=10) (the default), or None to turn the stall watchdog off."
    )


# ---------------------------------------------------------------------------------------------- progress marks


class Progress:
    """Where this process's main thread is: written by it on every marked call, read by the watchdog thread."""

    __slots__ = ("calls", "last", "moved", "stack")

    def __init__(self) -> None:
        self.calls = 0
        self.last: str | None = None  # the call entered most recently
        self.stack: list[str] = []  # the marked calls it is inside, innermost last
        self.moved = time.monotonic()  # when it last entered or left one

    def snapshot(self) -> tuple[int, str | None, bool, float]:
        """(calls, the innermost call it is in or else the last it entered, whether inside one, when it last moved)."""
        inner = self.stack[-1:]  # one read: the main thread may pop meanwhile
        return self.calls, inner[0] if inner else self.last, bool(inner), self.moved


progress = Progress()  # one per process: the watchdog watches the process, whichever strategy made the calls


def _marked(label: str, method: F) -> F:
    named = label == "barrier"  # barrier(name): the name says which sync point ('prepare_data', ...)

    @functools.wraps(method)
    def marked(*args: Any, **kwargs: Any) -> Any:
        here = label
        if named and (name := kwargs.get("name", args[1] if len(args) > 1 else None)):
            here = f"{label}({name!r})"
        progress.calls += 1
        progress.last = here
        progress.stack.append(here)
        progress.moved = time.monotonic()
        try:
            return method(*args, **kwargs)
        finally:
            progress.stack.pop()
            progress.moved = time.monotonic()

    marked.__torchloom_marked__ = True  # type: ignore[attr-defined]
    return marked  # type: ignore[return-value]


def mark_calls(cls: type, inherited: bool = False) -> None:
    """Makes ``cls``'s ``MARKED_CALLS`` record progress: those it defines, and with ``inherited`` those it inherits."""
    for name in MARKED_CALLS:
        method = getattr(cls, name, None) if inherited else cls.__dict__.get(name)
        if callable(method) and not getattr(method, "__torchloom_marked__", False):
            setattr(cls, name, _marked(name, method))


# ---------------------------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Heartbeat:
    """One rank's published progress. Times are wall-clock seconds (``time.time()``) of the rank that wrote it."""

    calls: int
    label: str | None  # the innermost marked call it is in, else the last it entered (None: none yet)
    inside: bool  # whether it is inside that call
    moved: float  # when it last entered or left a marked call
    beat: float  # when it published this
    done: bool = False  # its watchdog stopped at teardown: it left the job on purpose

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Heartbeat:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Stall:
    late: list[int]  # ranks that did not arrive: fewer calls, a stopped heartbeat, or none at all
    frozen: list[int]  # those of them whose heartbeat stopped
    waiting: list[int]  # ranks that did arrive, waiting for them


def find_stall(beats: Mapping[int, Heartbeat | None], now: float, stall_timeout: datetime.timedelta) -> Stall | None:
    """The stall in ``beats`` (rank -> heartbeat, ``None``: none published), or ``None`` when there is none.

    A rank is late when its heartbeat is missing or older than ``stall_timeout`` (its process is frozen or gone),
    or when it made fewer calls than the live ranks furthest ahead. It is a stall once one of those furthest
    ahead has not moved for ``stall_timeout``. Ranks whose watchdog stopped at teardown are never late.
    """
    limit = stall_timeout.total_seconds()
    live = {r: b for r, b in beats.items() if b is not None and (b.done or now - b.beat <= limit)}
    running = {r: b for r, b in live.items() if not b.done}
    if not running:
        return None
    front = max(b.calls for b in running.values())
    late = sorted(r for r in beats if r not in live or (r in running and running[r].calls < front))
    waiting = sorted(r for r, b in running.items() if b.calls == front)
    if all(running[r].inside and running[r].label in PATIENT_BARRIERS for r in waiting):
        return None
    if late and any(now - running[r].moved >= limit for r in waiting):
        frozen = [r for r in late if beats[r] is not None and r not in live]
        return Stall(late=late, frozen=frozen, waiting=waiting)
    return None


def _where(beat: Heartbeat, now: float) -> str:
    idle = now - beat.moved
    if beat.label is None:
        return f"made no strategy call yet ({idle:.0f} s after its start)"
    if beat.inside:
        return f"is in '{beat.label}' (call {beat.calls}) for {idle:.0f} s"
    return f"left '{beat.label}' (call {beat.calls}) {idle:.0f} s ago and reached no strategy call since"


def _span(ranks: list[int]) -> str:
    """``[0, 2-5, 9]``: a thousand ranks fit on a line."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    return "[" + ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs) + "]"


_MAX_LATE_LINES = 16


def describe_stall(stall: Stall, beats: Mapping[int, Heartbeat | None], now: float, rank: int) -> str:
    """The message naming who did not arrive and where the others wait, as rank ``rank`` sees it."""
    lines = [f"torchloom stall watchdog (on rank {rank}): rank(s) {_span(stall.late)} did not arrive."]
    for r in stall.late[:_MAX_LATE_LINES]:
        beat = beats.get(r)
        if beat is None:
            lines.append(f"  rank {r} never published a heartbeat (its watchdog did not start, or it never joined)")
        elif r in stall.frozen:  # what it said last, before it stopped running Python
            frozen = f"its heartbeat stopped {now - beat.beat:.0f} s ago (process frozen or gone); last heard, it"
            lines.append(f"  rank {r} did not arrive: {frozen} {_where(beat, beat.beat)}")
        else:
            lines.append(f"  rank {r} did not arrive: it {_where(beat, now)}")
    if len(stall.late) > _MAX_LATE_LINES:
        lines.append(f"  ... and {len(stall.late) - _MAX_LATE_LINES} more")
    groups: dict[tuple[int, str | None, bool], list[int]] = {}  # the waiting ranks, by where they wait
    for r in stall.waiting:
        beat = beats[r]
        assert beat is not None
        groups.setdefault((beat.calls, beat.label, beat.inside), []).append(r)
    for ranks in groups.values():
        longest = min(ranks, key=lambda r: beats[r].moved)  # type: ignore[union-attr]
        where = _where(beats[longest], now)  # type: ignore[arg-type]
        if len(ranks) == 1:
            lines.append(f"  rank {longest} arrived and waits: it {where}")
        else:
            lines.append(f"  ranks {_span(ranks)} arrived and wait; the longest, rank {longest}, {where}")
    if rank in stall.late:
        whose = "This rank is one that did not arrive: its main thread's stack below shows where it is."
    else:
        whose = (
            "The late rank's own report, where its process still runs Python, shows where it is; this rank's follows."
        )
    lines.append(
        "A rank that stops reaching the strategy's calls (a hang in user code or data loading, a deadlock, a frozen "
        f"process) leaves the others blocked in a collective. {whose} If this work is legitimately this slow on one "
        "rank, raise the strategy's stall_timeout (stall_timeout=None turns the watchdog off)."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the thread


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
