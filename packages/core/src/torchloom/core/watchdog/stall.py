"""The decision: from every rank's heartbeat, which ranks did not arrive and where the others wait.

Pure functions of the heartbeats (no store, no thread), so every case is testable in one process.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass

from torchloom.core.errors import ConfigurationError, TorchloomError

__all__ = [
    "DEFAULT_STALL_TIMEOUT",
    "PATIENT_BARRIERS",
    "STALL_EXIT_CODE",
    "Heartbeat",
    "Stall",
    "StallError",
    "check_stall_timeout",
    "describe_stall",
    "find_stall",
]

# below the process group's 30-minute default, so the stalled rank is named before the collective times out
DEFAULT_STALL_TIMEOUT = datetime.timedelta(minutes=10)
STALL_EXIT_CODE = 86  # distinct from Python's 1 (exception) and a signal's 128+N, so scripts can tell a stall
# sync points where the other ranks wait on purpose while one rank does one-off work of any length (downloads in
# the Trainer's prepare_data, Fabric's rank_zero_first): waiting there is no stall; the process-group timeout bounds it
PATIENT_BARRIERS = ("barrier('prepare_data')", "barrier('rank_zero_first')")


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
