"""The dataloaders of one run: found (arguments > datamodule > module), split over processes, counted."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from torchloom.core.errors import ConfigurationError
from torchloom.trainer.data import (
    KINDS,
    count_batches,
    find_dataloader_method,
    prepare_loader,
    to_loader_list,
)

if TYPE_CHECKING:
    from torchloom.trainer.trainer import Trainer

__all__ = ["DataSource"]

_ARGUMENT = {"train": "train_dataloaders", "val": "val_dataloaders", "test": "dataloaders", "predict": "dataloaders"}
_LIMIT = {"train": "limit_train_batches", "val": "limit_val_batches", "test": "limit_test_batches"}
_LIMIT["predict"] = "limit_predict_batches"


class DataSource:
    """Holds what ``fit``/``validate``/... were given, and the loaders built from it for the current run."""

    def __init__(self, given: dict[str, Any], datamodule: Any, fn: str) -> None:
        self.given = given  # kind -> the argument (None when not given)
        self.datamodule = datamodule
        self.fn = fn
        self.loaders: dict[str, list[Iterable[Any]]] = {kind: [] for kind in KINDS}
        self.counts: dict[str, list[int | float]] = {kind: [] for kind in KINDS}

    @property
    def train_loader(self) -> Iterable[Any]:
        loaders = self.loaders["train"]
        if not loaders:
            raise RuntimeError("The training dataloader is not loaded yet.")
        return loaders[0]

    def load(self, trainer: Trainer, kind: str, required: bool) -> None:
        """Calls the source of ``kind``'s dataloaders and prepares them; raises when ``required`` and there are none."""
        raw, where = self._fetch(trainer, kind)
        if raw is None:
            if required:
                raise ConfigurationError(self._missing(kind))
            self.loaders[kind], self.counts[kind] = [], []
            return
        config = trainer._config
        items = to_loader_list(raw, kind, where)
        strategy = trainer.strategy
        sampler_kwargs = strategy.distributed_sampler_kwargs if config.use_distributed_sampler else None
        split = config.use_distributed_sampler
        items = [prepare_loader(item, sampler_kwargs, strategy.global_rank, kind, split=split) for item in items]
        items = [strategy.process_dataloader(item) for item in items]
        limit_name = _LIMIT[kind]
        limit = getattr(config, limit_name)
        self.loaders[kind] = items
        self.counts[kind] = [count_batches(item, limit, limit_name) for item in items]

    def _fetch(self, trainer: Trainer, kind: str) -> tuple[Any, str]:
        argument = _ARGUMENT[kind]
        if self.given.get(kind) is not None:
            return self.given[kind], f"{self.fn}({argument}=...)"
        if self.datamodule is not None:
            method = find_dataloader_method(self.datamodule, kind)
            name = f"{type(self.datamodule).__name__}.{kind}_dataloader()"
            return (method() if method is not None else None), name
        module = trainer.loom_module
        if find_dataloader_method(module, kind) is not None:
            return trainer._call_module(f"{kind}_dataloader"), f"{type(module).__name__}.{kind}_dataloader()"
        return None, ""

    def _missing(self, kind: str) -> str:
        what = {"train": "training", "val": "validation", "test": "test", "predict": "predict"}[kind]
        return (
            f"{self.fn}() has no {what} data. Valid: pass {_ARGUMENT[kind]}= to {self.fn}(), a datamodule that "
            f"defines {kind}_dataloader(), or define {kind}_dataloader() on the module."
        )
