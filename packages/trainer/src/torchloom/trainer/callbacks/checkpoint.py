"""ModelCheckpoint: saves the model during fit and keeps the best ``save_top_k`` files by a monitored metric.

When it saves: every ``every_n_train_steps`` optimizer steps, or (the default) every ``every_n_epochs``
epochs at the end of validation, or at the end of the training epoch when the fit has no validation.
Every rank calls ``trainer.save_checkpoint`` (the strategy decides who writes), and every decision that
depends on rank-local values (the score, the file name) is taken on rank 0 and broadcast, so all ranks
keep the same ranking and call the collective save together.
"""

from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from typing_extensions import override

from torchloom.core.errors import ConfigurationError, choices
from torchloom.core.utils.rank_zero import rank_zero_info, rank_zero_warn
from torchloom.trainer.callbacks.callback import Callback

if TYPE_CHECKING:
    from torchloom.trainer.module import LoomModule
    from torchloom.trainer.trainer import Trainer

__all__ = ["ModelCheckpoint", "format_template", "has_validation", "skips_callbacks"]

MODES = ("min", "max")
# a template field: {name}, {name:.2f}, {name!r:>8}
_FIELD = re.compile(r"\{([^{}:!]+)(![rsa])?(:[^{}]*)?\}")


class ModelCheckpoint(Callback):
    """Saves checkpoints during ``fit``; see the module docstring for when.

    ``filename`` is a template such as ``"{epoch}-{val_loss:.2f}"``; with ``auto_insert_metric_name`` each
    field is written as ``name=value`` (``epoch=3-val_loss=0.12.ckpt``). Names that would collide with an
    existing file get ``-v1``, ``-v2``... ``save_top_k=-1`` keeps every file, ``0`` none (``save_last``
    only). Without ``monitor``, ``save_top_k=1`` keeps only the latest file.
    """

    CHECKPOINT_NAME_LAST = "last"
    FILE_EXTENSION = ".ckpt"

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool | None = None,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        save_weights_only: bool = False,
        auto_insert_metric_name: bool = True,
        verbose: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ConfigurationError(f"ModelCheckpoint(mode={mode!r}) is not valid; expected one of {choices(MODES)}.")
        if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1:
            raise ConfigurationError(f"ModelCheckpoint(save_top_k={save_top_k!r}): pass -1 (keep all), 0 or a count.")
        if monitor is None and save_top_k not in (-1, 0, 1):
            raise ConfigurationError(
                f"ModelCheckpoint(save_top_k={save_top_k}, monitor=None): ranking needs a metric; pass monitor=... "
                "or save_top_k in -1, 0, 1."
            )
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigurationError(f"ModelCheckpoint({name}={value!r}) must be None or an int >= 0.")
        if (every_n_train_steps or 0) > 0 and (every_n_epochs or 0) > 0:
            raise ConfigurationError(
                f"ModelCheckpoint: every_n_train_steps={every_n_train_steps} and every_n_epochs={every_n_epochs} "
                "are mutually exclusive; set one of them."
            )
        if dirpath is not None and os.path.isfile(dirpath):
            raise ConfigurationError(f"ModelCheckpoint(dirpath={os.fspath(dirpath)!r}) is a file, not a folder.")
        self.dirpath: str | None = os.fspath(dirpath) if dirpath is not None else None
        self.filename = filename
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.save_weights_only = save_weights_only
        self.auto_insert_metric_name = auto_insert_metric_name
        self.verbose = verbose
        self._every_n_train_steps = every_n_train_steps or 0
        self._every_n_epochs = every_n_epochs if every_n_epochs is not None else (0 if every_n_train_steps else 1)
        self.best_k_models: dict[str, Tensor] = {}
        self.kth_best_model_path = ""
        self.kth_value = torch.tensor(math.inf if mode == "min" else -math.inf)
        self.best_model_path = ""
        self.best_model_score: Tensor | None = None
        self.current_score: Tensor | None = None
        self.last_model_path = ""
        self._last_global_step_saved = 0  # no checkpoint before the first optimizer step
        self._validation_ran = False
        self._warned_missing = False
        self._pending_state: dict[str, Any] | None = None
        self._restored = False  # load_state_dict was called: this fit resumes
        self._warn_not_empty = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            monitor=self.monitor,
            mode=self.mode,
            every_n_train_steps=self._every_n_train_steps,
            every_n_epochs=self._every_n_epochs,
        )

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, module: LoomModule, stage: str) -> None:
        if stage != "fit":
            return
        self._validation_ran = False
        dirpath = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        self.dirpath = trainer.strategy.broadcast(os.fspath(dirpath), 0)  # loggers may pick versions per rank
        # warned at the first save, once it is known whether this fit resumed (state loaded) or not
        self._warn_not_empty = self.save_top_k != 0 and trainer.is_global_zero and _has_files(self.dirpath)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None

    @override
    def on_train_batch_end(
        self, trainer: Trainer, module: LoomModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = self._every_n_train_steps
        if n > 0 and trainer.global_step % n == 0 and not self._skips(trainer):
            self._save_all(trainer, epoch_level=False)

    @override
    def on_train_epoch_end(self, trainer: Trainer, module: LoomModule) -> None:
        # with validation, the save happens at validation end, where validation metrics exist
        due = self._every_n_train_steps == 0 and not has_validation(trainer) and self._epoch_due(trainer)
        if due and not self._skips(trainer):
            self._save_all(trainer, epoch_level=True)

    @override
    def on_validation_end(self, trainer: Trainer, module: LoomModule) -> None:
        if skips_callbacks(trainer):
            return
        self._validation_ran = True
        if self._every_n_train_steps == 0 and self._epoch_due(trainer) and not self._skips(trainer):
            self._save_all(trainer, epoch_level=True)

    # ------------------------------------------------------------------ saving
    def _epoch_due(self, trainer: Trainer) -> bool:
        return self._every_n_epochs > 0 and (trainer.current_epoch + 1) % self._every_n_epochs == 0

    def _skips(self, trainer: Trainer) -> bool:
        # fast_dev_run is a smoke test: it must not leave checkpoints behind
        return (
            skips_callbacks(trainer)
            or bool(trainer.fast_dev_run)
            or trainer.global_step == self._last_global_step_saved
        )

    def _save_all(self, trainer: Trainer, epoch_level: bool) -> None:
        if self._warn_not_empty and not self._restored:
            rank_zero_warn(f"The checkpoint folder {self.dirpath!r} is not empty; files in it may be overwritten.")
        self._warn_not_empty = False
        metrics = self._monitor_candidates(trainer)
        self._save_top_k(trainer, metrics, epoch_level)
        self._save_last(trainer, metrics)

    def _monitor_candidates(self, trainer: Trainer) -> dict[str, Any]:
        metrics: dict[str, Any] = dict(trainer.callback_metrics)
        metrics.setdefault("epoch", trainer.current_epoch)
        metrics.setdefault("step", trainer.global_step)
        return metrics

    def _save_top_k(self, trainer: Trainer, metrics: dict[str, Any], epoch_level: bool) -> None:
        if self.save_top_k == 0:
            return
        score: float | None = None
        if self.monitor is not None:
            if self.monitor not in metrics:
                self._missing_monitor(metrics, epoch_level)
                return
            score = _finite_score(metrics[self.monitor], self.mode)
        # rank 0 decides (its score, its file system); every rank applies the same decision
        dropped = self._dropped_path(score)
        plan: tuple[float | None, str | None] = (score, None)
        if self.monitor is None:  # save_top_k=1 overwrites (then removes) the previous file
            plan = (None, self._free_path(metrics, keep=self.best_model_path if self.save_top_k == 1 else ""))
        elif dropped is not None or self._has_room():
            plan = (score, self._free_path(metrics, keep=dropped or ""))
        score, path = trainer.strategy.broadcast(plan, 0)
        if path is None:
            return
        if self.monitor is None:
            previous = self.best_model_path
            self.best_model_path = path
            self._save_file(trainer, path)
            if self.save_top_k == 1 and previous and previous != path:
                trainer.strategy.remove_checkpoint(previous)
            return
        assert score is not None
        dropped = self._dropped_path(score)
        self._rank(path, score, dropped)
        self._save_file(trainer, path)
        if self.verbose:
            rank_zero_info(
                f"Epoch {trainer.current_epoch}, step {trainer.global_step}: {self.monitor!r} reached {score:.5g} "
                f"(best {self.best_model_score:.5g}); saved {path!r} as one of the top {self.save_top_k}."
            )
        if dropped and dropped != path:
            trainer.strategy.remove_checkpoint(dropped)

    def _has_room(self) -> bool:
        return self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k

    def _dropped_path(self, score: float | None) -> str | None:
        """The file a new score would push out of the top k, or ``None`` (room left or not better)."""
        if score is None or self._has_room():
            return None
        kth = float(self.kth_value)
        better = score < kth if self.mode == "min" else score > kth
        return self.kth_best_model_path if better else None

    def _rank(self, path: str, score: float, dropped: str | None) -> None:
        if dropped is not None:
            self.best_k_models.pop(dropped, None)
        self.current_score = torch.tensor(score)
        self.best_k_models[path] = self.current_score
        worst, best = (max, min) if self.mode == "min" else (min, max)
        if self.save_top_k != -1 and len(self.best_k_models) == self.save_top_k:
            self.kth_best_model_path = worst(self.best_k_models, key=lambda p: float(self.best_k_models[p]))
            self.kth_value = self.best_k_models[self.kth_best_model_path]
        self.best_model_path = best(self.best_k_models, key=lambda p: float(self.best_k_models[p]))
        self.best_model_score = self.best_k_models[self.best_model_path]

    def _save_last(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if not self.save_last:
            return
        path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)
        path = trainer.strategy.broadcast(path, 0)
        previous, self.last_model_path = self.last_model_path, path
        self._save_file(trainer, path)
        if previous and previous != path and previous not in self.best_k_models and previous != self.best_model_path:
            trainer.strategy.remove_checkpoint(previous)

    def _save_file(self, trainer: Trainer, path: str) -> None:
        self._last_global_step_saved = trainer.global_step
        trainer.save_checkpoint(path, weights_only=self.save_weights_only)

    def _missing_monitor(self, metrics: dict[str, Any], epoch_level: bool) -> None:
        message = (
            f"ModelCheckpoint(monitor={self.monitor!r}) found no metric named {self.monitor!r}; the logged metrics "
            f"are {choices(sorted(metrics))}. Log it with self.log({self.monitor!r}, value) in the LoomModule."
        )
        if epoch_level or self._validation_ran:
            raise ConfigurationError(message)
        if not self._warned_missing:  # a step-level check may come before the first validation
            self._warned_missing = True
            rank_zero_warn(message + " Step checkpoints are skipped until it is logged.")

    def _free_path(self, metrics: dict[str, Any], keep: str) -> str:
        """The formatted file name, with ``-vN`` added while it names an existing file other than ``keep``."""
        path = self.format_checkpoint_name(metrics)
        version = 1
        while os.path.exists(path) and path != keep:
            path = self.format_checkpoint_name(metrics, version=version)
            version += 1
        return path

    def format_checkpoint_name(
        self, metrics: dict[str, Any], filename: str | None = None, version: int | None = None
    ) -> str:
        """The checkpoint path for ``metrics``: ``dirpath/<filled template>[-vN].ckpt``."""
        name = format_template(filename or self.filename or "{epoch}-{step}", metrics, self.auto_insert_metric_name)
        if version is not None:
            name = f"{name}-v{version}"
        name += self.FILE_EXTENSION
        return os.path.join(self.dirpath, name) if self.dirpath else name

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "dirpath": self.dirpath,
            "best_model_score": self.best_model_score,
            "best_model_path": self.best_model_path,
            "current_score": self.current_score,
            "best_k_models": dict(self.best_k_models),
            "kth_best_model_path": self.kth_best_model_path,
            "kth_value": self.kth_value,
            "last_model_path": self.last_model_path,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = True
        if self.dirpath is None:  # resolved in setup; apply then
            self._pending_state = dict(state_dict)
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        saved_dir = state.get("dirpath")
        if saved_dir is not None and self.dirpath is not None and _same_dir(saved_dir, self.dirpath):
            self.best_model_score = state["best_model_score"]
            self.current_score = state["current_score"]
            self.best_k_models = dict(state["best_k_models"])
            self.kth_best_model_path = state["kth_best_model_path"]
            self.kth_value = state["kth_value"]
            self.last_model_path = state["last_model_path"]
        else:
            rank_zero_warn(
                f"ModelCheckpoint: the checkpoint was saved to {saved_dir!r} but this run saves to {self.dirpath!r}; "
                "the top-k ranking starts afresh (only best_model_path is restored)."
            )
        self.best_model_path = state["best_model_path"]


def format_template(template: str, metrics: dict[str, Any], insert_names: bool = True) -> str:
    """Fills ``{name[:spec]}`` fields from ``metrics`` (``name=value`` when ``insert_names``)."""

    def fill(match: re.Match[str]) -> str:
        name, conversion, spec = match.group(1).strip(), match.group(2) or "", match.group(3) or ""
        if name not in metrics:
            raise ConfigurationError(
                f"The checkpoint filename {template!r} uses {name!r}, which was not logged; the available names "
                f"are {choices(sorted(metrics))}."
            )
        value = metrics[name]
        if isinstance(value, Tensor):
            value = value.item()
        text = ("{0" + conversion + spec + "}").format(value)
        return f"{name}={text}" if insert_names else text

    return _FIELD.sub(fill, template)


def has_validation(trainer: Trainer) -> bool:
    """Whether this fit runs validation at all (some validation dataloader with batches)."""
    return sum(trainer.num_val_batches or []) > 0


def skips_callbacks(trainer: Trainer) -> bool:
    """Checkpoint and early-stopping checks run only inside a real fit, never in the sanity check."""
    return trainer.state.fn != "fit" or trainer.sanity_checking


def _finite_score(value: Any, mode: str) -> float:
    score = float(value.item() if isinstance(value, Tensor) else value)
    if math.isnan(score):  # a NaN never ranks: it is the worst possible value
        return math.inf if mode == "min" else -math.inf
    return score


def _has_files(folder: str) -> bool:
    return os.path.isdir(folder) and bool(os.listdir(folder))


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)
