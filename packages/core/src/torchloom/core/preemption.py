"""Preemption: the signal a scheduler sends before it stops a job, turned into a stop every rank agrees on.

``PreemptionWatch`` installs handlers (main thread only; the previous handlers come back on
``uninstall``) that only record which signal arrived. ``requested()``, called once per training step
on every rank, makes the ranks agree (any rank's signal stops all, at the same step), so they can save
a checkpoint together and leave the loop. Under SLURM, ``requeue()`` then has global rank 0 run
``scontrol requeue <job id>`` when the stop came from the requeue signal (``#SBATCH --signal=USR1@90``
sends SIGUSR1 90 s before the time limit). SIGTERM alone never requeues: ``scancel`` sends it too.

``forwarding_signals`` is for launchers whose parent process waits on its workers: it passes SIGTERM
and SIGUSR1 on to them instead of dying and leaving them without a chance to save.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from torchloom.core.environments.slurm import SLURMEnvironment
from torchloom.core.errors import ConfigurationError, TorchloomError

if TYPE_CHECKING:
    from torchloom.core.strategies.strategy import Strategy

__all__ = ["PreemptionWatch", "RequeueError", "check_arguments", "forwarding_signals", "parse_signals"]

SignalSpec = str | int | signal.Signals
_UNCATCHABLE = frozenset({signal.SIGKILL, signal.SIGSTOP})
_FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
_CHECK_SECONDS = 1.0  # adaptive checks: about this far apart
_MAX_INTERVAL = 1000
_VALID = (
    "signal names such as 'SIGTERM' or 'USR1', signal numbers, or signal.Signals members "
    "(not SIGKILL or SIGSTOP: those cannot be caught)"
)


class RequeueError(TorchloomError, RuntimeError):
    """``scontrol requeue`` could not be run or failed; the message says what to do."""


def parse_signals(
    signals: SignalSpec | Sequence[SignalSpec], owner: str = "PreemptionWatch"
) -> tuple[signal.Signals, ...]:
    """``signals`` as ``signal.Signals`` members, duplicates dropped; an empty sequence means none."""
    items = [signals] if isinstance(signals, (str, int)) else signals
    if not isinstance(items, Sequence):
        raise ConfigurationError(f"{owner}(signals={signals!r}) is not valid. Valid: {_VALID}, or a list of them.")
    parsed: list[signal.Signals] = []
    for item in items:
        found = _one_signal(item)
        if found is None or found in _UNCATCHABLE:
            raise ConfigurationError(f"{owner}(signals={signals!r}): {item!r} is not valid. Valid: {_VALID}.")
        if found not in parsed:
            parsed.append(found)
    return tuple(parsed)


def _one_signal(item: object) -> signal.Signals | None:
    if isinstance(item, bool):
        return None
    if isinstance(item, int):
        return signal.Signals(item) if item in {s.value for s in signal.Signals} else None
    if isinstance(item, str):
        name = item.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        member = signal.Signals.__members__.get(name)
        return member
    return None


def check_arguments(
    owner: str,
    *,
    signals: SignalSpec | Sequence[SignalSpec] | None,
    check_every_n_steps: int | None,
    requeue: bool | None,
) -> None:
    """Refuses bad ``PreemptionWatch`` arguments with a ``ConfigurationError`` naming ``owner``."""
    if signals is not None:
        parse_signals(signals, owner)
    steps = check_every_n_steps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigurationError(
            f"{owner}(check_every_n_steps={steps!r}) is not valid. Valid: an int >= 1, or None (about once a second)."
        )
    if requeue is not None and not isinstance(requeue, bool):
        raise ConfigurationError(f"{owner}(requeue={requeue!r}) is not valid. Valid: True, False or None.")


class PreemptionWatch:
    """Catches ``signals`` and tells every rank, at the same step, that the job should save and stop.

    ``signals=None``: SIGTERM, plus the SLURM requeue signal (SIGUSR1 unless the strategy's
    ``SLURMEnvironment`` names another) when the job runs under SLURM. An empty list catches nothing.

    ``check_every_n_steps``: how often ``requested()`` asks the other ranks. Each check is one
    all-reduce of a single value (measured ~1 ms over gloo on a busy 2-core machine, as much as any
    all-reduce there; with NCCL also a host-device sync that stops the CPU from queueing work ahead of
    the GPU), too much for every step of a small model. ``None`` (the default) checks about once a
    second: after each check rank 0 proposes the next interval from the measured step time (at most
    doubling, at most 1000 steps) and broadcasts it, so the ranks keep checking at the same steps and
    react within about a second plus a step, inside the usual grace periods (30 s in Kubernetes, SLURM's
    KillWait and torchrun's agent; 10 s under strategy='ddp''s agent, its ``termination_timeout``). An
    int checks every that many steps. On one process a check is a flag read.

    ``requeue``: under SLURM, requeue the job when the stop came from the requeue signal; ``None``
    follows the ``SLURMEnvironment``'s ``auto_requeue`` (``True`` by default).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        signals: SignalSpec | Sequence[SignalSpec] | None = None,
        check_every_n_steps: int | None = None,
        requeue: bool | None = None,
        owner: str = "PreemptionWatch",
    ) -> None:
        check_arguments(owner, signals=signals, check_every_n_steps=check_every_n_steps, requeue=requeue)
        environment = getattr(strategy, "cluster_environment", None)
        slurm = environment if isinstance(environment, SLURMEnvironment) else None
        self._job_id = (slurm or SLURMEnvironment()).job_id  # None outside SLURM
        requeue_signal = slurm.requeue_signal if slurm is not None else signal.SIGUSR1
        self._requeue_signals = frozenset({requeue_signal} if requeue_signal is not None else ())
        if signals is None:
            defaults = [signal.SIGTERM] + ([requeue_signal] if self._job_id and requeue_signal else [])
            self.signals = tuple(dict.fromkeys(defaults))
        else:
            self.signals = parse_signals(signals, owner)
        self.requeue_enabled = (slurm.auto_requeue if slurm is not None else True) if requeue is None else requeue
        self.check_every_n_steps = check_every_n_steps
        self._strategy = strategy
        self._previous: dict[signal.Signals, Any] = {}
        self._received: signal.Signals | None = None
        self._requeue_seen = False  # a requeue signal came (maybe after another watched one)
        self._calls = 0
        self._next_check = check_every_n_steps or 1  # the call that checks next: the same on every rank
        self._interval = self._next_check
        self._last_check: tuple[int, float] | None = None  # (call, time) of the last check
        self._stop = False
        self._requeue_agreed = False

    @property
    def signal(self) -> signal.Signals | None:
        """The first watched signal this process received, or ``None``."""
        return self._received

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> None:
        """Replaces the handlers of the watched signals (from the main thread only, as Python requires)."""
        if self._previous or not self.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            raise ConfigurationError(
                "PreemptionWatch.install() was called from a thread other than the main one; Python lets only the "
                "main thread handle signals. Valid: install it in the main thread, or pass signals=[] to watch none."
            )
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._record)

    def uninstall(self) -> None:
        """Puts the handlers that were there before ``install`` back."""
        previous, self._previous = self._previous, {}
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # a handler may run between any two bytecodes: it only records, the loop acts at the next step
        if self._received is None:
            self._received = signal.Signals(signum)
        self._requeue_seen = self._requeue_seen or signum in self._requeue_signals

    def requested(self) -> bool:
        """Whether to save and stop now; the same answer on every rank. Call it once per step on every rank."""
        if self._stop:
            return True
        self._calls += 1
        if self._calls < self._next_check:
            return False
        self._stop = self._strategy.reduce_boolean_decision(self._received is not None, all=False)
        if self._stop and self.requeue_enabled and self._job_id:  # the same on every rank: one more vote
            self._requeue_agreed = self._strategy.reduce_boolean_decision(self._requeue_seen, all=False)
        if not self._stop:
            self._interval = self._next_interval()
            self._next_check = self._calls + self._interval
        return self._stop

    @property
    def check_interval(self) -> int:
        """Steps from the last check to the next one (the same on every rank)."""
        return self._interval

    def _next_interval(self) -> int:
        if self.check_every_n_steps is not None:
            return self.check_every_n_steps
        now, previous = time.monotonic(), self._last_check
        self._last_check = (self._calls, now)
        if previous is None:
            return 1
        steps = self._calls - previous[0]
        per_step = max(now - previous[1], 1e-6) / steps
        proposal = max(1, min(2 * steps, _MAX_INTERVAL, int(_CHECK_SECONDS / per_step)))
        return int(self._strategy.broadcast(proposal, 0))  # rank 0's clock decides for all

    def requeue(self) -> bool:
        """After the save, on every rank: under SLURM and after the requeue signal, rank 0 requeues the job.

        Returns whether the job was requeued. ``RequeueError`` when ``scontrol`` is missing or fails.
        """
        if not self._requeue_agreed:
            return False
        if self._strategy.is_global_zero:
            assert self._job_id is not None
            run_scontrol_requeue(self._job_id)
        return True

    def __enter__(self) -> PreemptionWatch:
        self.install()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.uninstall()


def run_scontrol_requeue(job_id: str) -> None:
    executable = shutil.which("scontrol")
    if executable is None:
        raise RequeueError(
            f"Cannot requeue SLURM job {job_id}: 'scontrol' is not on PATH. The checkpoint is saved; resubmit the job "
            "with sbatch, or pass requeue=False to stop without requeueing."
        )
    done = subprocess.run([executable, "requeue", job_id], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RequeueError(
            f"'scontrol requeue {job_id}' failed with exit code {done.returncode}: {done.stderr.strip()[-1000:]} "
            "The checkpoint is saved; resubmit the job with sbatch (a job needs --requeue, or the cluster's "
            "JobRequeue=1, to be requeued)."
        )


@contextlib.contextmanager
def forwarding_signals(pids: Callable[[], Iterable[int | None]]) -> Iterator[None]:
    """While inside, SIGTERM and SIGUSR1 sent to this process go to ``pids()`` instead (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: FrameType | None) -> None:
        for pid in pids():
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

    previous = {number: signal.signal(number, forward) for number in _FORWARDED}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
