"""ModelSummary: a table of the model's layers with parameter counts, printed when fit starts (rank 0)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn
from typing_extensions import override

from torchloom.core.errors import ConfigurationError
from torchloom.trainer.callbacks.callback import Callback

if TYPE_CHECKING:
    from torchloom.trainer.module import LoomModule
    from torchloom.trainer.trainer import Trainer

__all__ = ["LayerSummary", "ModelSummary", "Summary", "summarize"]


@dataclass(frozen=True)
class LayerSummary:
    name: str
    type: str
    params: int
    training: bool


@dataclass(frozen=True)
class Summary:
    """Counts for a whole model; ``size_mb`` is the parameters' memory (their real dtypes) in megabytes."""

    layers: list[LayerSummary] = field(default_factory=list)
    trainable: int = 0
    non_trainable: int = 0
    size_mb: float = 0.0

    @property
    def total(self) -> int:
        return self.trainable + self.non_trainable

    def __str__(self) -> str:
        rows = [("", "Name", "Type", "Params", "Mode")]
        rows += [
            (str(i), s.name, s.type, _count(s.params), "train" if s.training else "eval")
            for i, s in enumerate(self.layers)
        ]
        widths = [max(len(row[c]) for row in rows) for c in range(5)]
        lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        rule = "-" * max(len(line) for line in lines)
        lines = [lines[0], rule, *lines[1:], rule] if self.layers else []
        lines += [
            f"{_count(self.trainable):<8} Trainable params",
            f"{_count(self.non_trainable):<8} Non-trainable params",
            f"{_count(self.total):<8} Total params",
            f"{self.size_mb:<8.3f} Total estimated model params size (MB)",
        ]
        return "\n".join(lines)


def summarize(module: nn.Module, max_depth: int = 1) -> Summary:
    """The summary of ``module``: one row per submodule down to ``max_depth`` (-1: all, 0: totals only)."""
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
        raise ConfigurationError(f"max_depth={max_depth!r} must be -1 (every layer), 0 (totals only) or a depth >= 1.")
    layers = []
    for name, sub in module.named_modules():
        depth = name.count(".") + 1
        if name and (max_depth == -1 or depth <= max_depth):
            layers.append(
                LayerSummary(name, type(sub).__name__, sum(_numel(p) for p in sub.parameters()), sub.training)
            )
    trainable = non_trainable = 0
    size = 0.0
    for p in module.parameters():  # parameters() yields a shared tensor once
        count = _numel(p)
        if p.requires_grad:
            trainable += count
        else:
            non_trainable += count
        size += count * p.element_size() if count else 0
    return Summary(layers, trainable, non_trainable, size / 1e6)


class ModelSummary(Callback):
    """Prints :func:`summarize` of the module at the start of ``fit`` on global rank 0."""

    def __init__(self, max_depth: int = 1) -> None:
        summarize(nn.Module(), max_depth)  # validates max_depth now, not when fit starts
        self.max_depth = max_depth

    @override
    def on_fit_start(self, trainer: Trainer, module: LoomModule) -> None:
        if trainer.is_global_zero:
            print(summarize(module, self.max_depth), flush=True)


def _numel(p: nn.Parameter) -> int:
    if isinstance(p, nn.parameter.UninitializedParameter):  # lazy layers have no size until their first call
        return 0
    return int(getattr(p, "ds_numel", p.numel()))  # DeepSpeed ZeRO-3 keeps the full size here; p holds a shard


def _count(n: int) -> str:
    """``1234567`` -> ``1.2 M``: the short forms people read in parameter tables."""
    for unit, scale in ((" T", 1e12), (" B", 1e9), (" M", 1e6), (" K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
