"""``Preemption``: core's ``PreemptionWatch`` for a Fabric loop. Call ``requested()`` once per step on every rank::

    with Preemption(fabric) as preemption:       # SIGTERM (+ SIGUSR1 under SLURM) now only sets a flag
        for step, batch in enumerate(loader, start=state["step"]):
            ...                                   # forward, fabric.backward, optimizer.step
            state["step"] = step + 1
            if preemption.requested():            # the same answer on every rank, at the same step
                fabric.save(path, state)
                preemption.requeue()              # under SLURM, after its warning signal: scontrol requeue
                break

The previous signal handlers come back when the ``with`` block ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torchloom.core.preemption import PreemptionWatch, SignalSpec

if TYPE_CHECKING:
    from torchloom.fabric.fabric import Fabric

__all__ = ["Preemption"]


class Preemption(PreemptionWatch):
    """Watches for preemption in ``fabric``'s job; the arguments are core ``PreemptionWatch``'s (see there)."""

    def __init__(
        self,
        fabric: Fabric,
        *,
        signals: SignalSpec | Sequence[SignalSpec] | None = None,
        check_every_n_steps: int | None = None,
        requeue: bool | None = None,
    ) -> None:
        super().__init__(
            fabric.strategy,
            signals=signals,
            check_every_n_steps=check_every_n_steps,
            requeue=requeue,
            owner="Preemption",
        )
