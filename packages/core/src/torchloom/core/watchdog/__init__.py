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

from torchloom.core.watchdog.marks import MARKED_CALLS, Progress, mark_calls, progress
from torchloom.core.watchdog.stall import (
    DEFAULT_STALL_TIMEOUT,
    PATIENT_BARRIERS,
    STALL_EXIT_CODE,
    Heartbeat,
    Stall,
    StallError,
    check_stall_timeout,
    describe_stall,
    find_stall,
)
from torchloom.core.watchdog.thread import StallWatchdog, watch_default_group

__all__ = [
    "DEFAULT_STALL_TIMEOUT",
    "MARKED_CALLS",
    "PATIENT_BARRIERS",
    "STALL_EXIT_CODE",
    "Heartbeat",
    "Progress",
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
