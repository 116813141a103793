"""What the Trainer is doing (``state.fn`` / ``state.stage``) and how far fitting has got (``FitProgress``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torchloom.core.errors import ConfigurationError

__all__ = ["FN", "STAGES", "FitProgress", "TrainerState"]

FN = ("fit", "validate", "test", "predict")
STAGES = ("train", "sanity_check", "validate", "test", "predict")


@dataclass
class TrainerState:
    """``fn``: the entry point running (``None`` between runs); ``stage``: the loop running inside it;
    ``preempted``: fit stopped early on a preemption signal, after saving a checkpoint to resume from."""

    fn: str | None = None
    stage: str | None = None
    preempted: bool = False

    def __post_init__(self) -> None:
        if self.fn is not None and self.fn not in FN:
            raise ConfigurationError(f"TrainerState.fn={self.fn!r} is not valid. Valid: {FN}.")


@dataclass
class FitProgress:
    """The fit loop's position, saved under ``"loops"`` in checkpoints so a resume continues exactly.

    ``batches_done`` counts the batches of ``epoch`` already trained; ``epoch_finished`` says every
    batch of ``epoch`` ran but its end (epoch schedulers, the move to the next epoch) did not yet.
    ``epoch_rng`` is the random state right before the epoch's dataloader iterator was made, from
    which a resume rebuilds the same batch order before fast-forwarding ``batches_done`` batches.

    ``samples_done`` counts the positions of the epoch's global sample order consumed so far by all
    ranks together (``world_size`` x the batch's share per rank, every batch; ``None`` when the training
    loader cannot begin part-way, see ``torchloom.core.data.resumable_sampler``); ``world_size`` is the
    number of processes that trained them; ``sample_order`` the kind of that order (``"seeded"`` or
    ``"drawn"``, see ``torchloom.core.samplers.ResumableDistributedSampler``). From these a resume on
    any number of processes begins at the next position. Checkpoints written before these fields have
    them ``None``.
    """

    epoch: int = 0
    global_step: int = 0
    batches_done: int = 0
    total_batches: int = 0  # training batches seen over all epochs
    epoch_finished: bool = False
    epoch_rng: dict[str, Any] | None = None
    samples_done: int | None = None
    world_size: int | None = None
    sample_order: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # callback metrics at save time (plateau schedulers)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key in self.__dataclass_fields__:
                setattr(self, key, value)

    def start_next_epoch(self) -> None:
        self.epoch += 1
        self.batches_done = 0
        self.samples_done = 0
        self.epoch_finished = False
        self.epoch_rng = None
