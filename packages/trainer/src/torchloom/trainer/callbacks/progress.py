"""Progress bars: a shared base that decides what to show and when, and tqdm / rich renderers.

The bar shows the epoch, batches done out of the total, the last training loss and every metric logged
with ``prog_bar=True``. It draws on global rank 0 only. Redrawing is the costly part on small models, so
it happens every ``refresh_rate`` batches and at most once per ``min_refresh_interval`` seconds (the last
batch of a bar is always drawn); values are read from their tensors only when drawn.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO

from torch import Tensor
from typing_extensions import override

from torchloom.core.errors import ConfigurationError
from torchloom.core.utils.imports import require
from torchloom.trainer.callbacks.callback import Callback

if TYPE_CHECKING:
    from torchloom.trainer.module import LoomModule
    from torchloom.trainer.trainer import Trainer

__all__ = ["ProgressBar", "RichProgressBar", "TQDMProgressBar"]

_TITLES = {"validate": "Validation", "test": "Testing", "predict": "Predicting"}


class ProgressBar(Callback):
    """Base of progress bars: the hooks, rank-0 gating and refresh throttling; renderers draw.

    A renderer implements ``_start(kind, description, total, leave)`` (create or reset the bar of
    ``kind`` in "train", "validate", "test", "predict"), ``_show(kind, n, metrics)`` and ``_finish(kind)``.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False, min_refresh_interval: float = 0.1) -> None:
        if isinstance(refresh_rate, bool) or not isinstance(refresh_rate, int) or refresh_rate < 0:
            raise ConfigurationError(f"refresh_rate={refresh_rate!r} must be an int >= 0 (0 disables the bar).")
        if min_refresh_interval < 0:
            raise ConfigurationError(f"min_refresh_interval={min_refresh_interval!r} must be >= 0 seconds.")
        self.refresh_rate = refresh_rate
        self.leave = leave
        self.min_refresh_interval = min_refresh_interval
        self._enabled = refresh_rate > 0
        self._open: dict[str, float | None] = {}  # kind -> total of the bar drawn now
        self._last_drawn: dict[str, float] = {}
        self._loss: Tensor | float | None = None

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def enable(self) -> None:
        self._enabled = self.refresh_rate > 0

    def disable(self) -> None:
        self._enabled = False

    def get_metrics(self, trainer: Trainer, module: LoomModule) -> dict[str, float | int | str]:
        """What the training bar shows next to the counts: loss, ``prog_bar`` metrics, logger version."""
        items: dict[str, float | int | str] = {}
        if self._loss is not None:
            items["loss"] = float(self._loss)
        for name, value in trainer.progress_bar_metrics.items():
            items[name] = value.item() if isinstance(value, Tensor) else value
        if trainer.logger is not None:
            version = trainer.logger.version
            items["v_num"] = version if isinstance(version, (int, str)) else str(version)
        return items

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, module: LoomModule, stage: str) -> None:
        if not trainer.is_global_zero:
            self.disable()

    @override
    def teardown(self, trainer: Trainer, module: LoomModule, stage: str) -> None:
        for kind in list(self._open):
            self._close(kind)

    @override
    def on_exception(self, trainer: Trainer, module: LoomModule, exception: BaseException) -> None:
        self.teardown(trainer, module, "")

    @override
    def on_train_epoch_start(self, trainer: Trainer, module: LoomModule) -> None:
        self._loss = None
        if self._enabled:
            # the training bar stays on screen at the end; leave=True keeps one line per epoch
            self._begin("train", f"Epoch {trainer.current_epoch}", trainer.num_training_batches, leave=True)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, module: LoomModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs if isinstance(outputs, Tensor) or not isinstance(outputs, Mapping) else outputs.get("loss")
        if isinstance(loss, Tensor):
            self._loss = loss.detach() if loss.requires_grad else loss  # the Trainer's outputs come detached
        elif isinstance(loss, (int, float)):
            self._loss = loss
        self._advance("train", batch_idx + 1, trainer, module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, module: LoomModule) -> None:
        if "train" in self._open:
            self._draw("train", None, trainer, module)  # epoch-level metrics are in now
            if self.leave:
                self._close("train")

    @override
    def on_train_end(self, trainer: Trainer, module: LoomModule) -> None:
        self._close("train")

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, module: LoomModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0:
            self._begin_eval("validate", trainer, dataloader_idx)

    @override
    def on_validation_batch_end(
        self, trainer: Trainer, module: LoomModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._advance("validate", batch_idx + 1, trainer, module)

    @override
    def on_validation_end(self, trainer: Trainer, module: LoomModule) -> None:
        self._close("validate")
        if "train" in self._open:  # show the new validation metrics next to the training counts
            self._draw("train", None, trainer, module)

    @override
    def on_test_batch_start(
        self, trainer: Trainer, module: LoomModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0:
            self._begin_eval("test", trainer, dataloader_idx)

    @override
    def on_test_batch_end(
        self, trainer: Trainer, module: LoomModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._advance("test", batch_idx + 1, trainer, module)

    @override
    def on_test_end(self, trainer: Trainer, module: LoomModule) -> None:
        self._close("test")

    @override
    def on_predict_batch_start(
        self, trainer: Trainer, module: LoomModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0:
            self._begin_eval("predict", trainer, dataloader_idx)

    @override
    def on_predict_batch_end(
        self, trainer: Trainer, module: LoomModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._advance("predict", batch_idx + 1, trainer, module)

    @override
    def on_predict_end(self, trainer: Trainer, module: LoomModule) -> None:
        self._close("predict")

    # ------------------------------------------------------------------ when to draw
    def _begin_eval(self, kind: str, trainer: Trainer, dataloader_idx: int) -> None:
        if not self._enabled:
            return
        if kind == "validate":
            totals = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        elif kind == "test":
            totals = trainer.num_test_batches
        else:
            totals = trainer.num_predict_batches
        total = totals[dataloader_idx] if totals and dataloader_idx < len(totals) else None
        title = "Sanity Checking" if trainer.sanity_checking else _TITLES[kind]
        if totals and len(totals) > 1:
            title += f" DataLoader {dataloader_idx}"
        self._begin(kind, title, total, leave=trainer.state.fn != "fit")

    def _begin(self, kind: str, description: str, total: float | None, leave: bool) -> None:
        bounded = None if total is None or math.isinf(total) else int(total)
        self._open[kind] = bounded
        self._last_drawn[kind] = -math.inf
        self._start(kind, description, bounded, leave)

    def _advance(self, kind: str, n: int, trainer: Trainer, module: LoomModule) -> None:
        if not self._enabled or kind not in self._open:
            return
        last = n == self._open[kind]
        if not last and n % self.refresh_rate != 0:
            return
        if not last and time.monotonic() - self._last_drawn[kind] < self.min_refresh_interval:
            return
        self._draw(kind, n, trainer, module)

    def _draw(self, kind: str, n: int | None, trainer: Trainer, module: LoomModule) -> None:
        self._last_drawn[kind] = time.monotonic()
        self._show(kind, n, self.get_metrics(trainer, module) if kind == "train" else {})

    def _close(self, kind: str) -> None:
        if kind in self._open:
            del self._open[kind]
            self._finish(kind)

    # ------------------------------------------------------------------ drawing (renderers)
    def _start(self, kind: str, description: str, total: int | None, leave: bool) -> None:
        raise NotImplementedError

    def _show(self, kind: str, n: int | None, metrics: dict[str, float | int | str]) -> None:
        """Moves the bar of ``kind`` to ``n`` batches (``None``: keep) and shows ``metrics``."""
        raise NotImplementedError

    def _finish(self, kind: str) -> None:
        raise NotImplementedError


class TQDMProgressBar(ProgressBar):
    """The default bar, drawn with tqdm to ``file`` (default: standard error)."""

    def __init__(
        self,
        refresh_rate: int = 1,
        process_position: int = 0,
        leave: bool = False,
        file: TextIO | None = None,
        min_refresh_interval: float = 0.1,
    ) -> None:
        super().__init__(refresh_rate, leave, min_refresh_interval)
        self.process_position = process_position
        self._file = file
        self._bars: dict[str, Any] = {}

    @override
    def _start(self, kind: str, description: str, total: int | None, leave: bool) -> None:
        from tqdm import tqdm  # type: ignore[import-untyped]  # lazily: keeps `import torchloom.trainer` cheap

        bar = self._bars.get(kind)
        if bar is not None:  # the training bar is reused from epoch to epoch
            # the description first: reset() redraws, and must not show the new epoch under the old number
            bar.set_description(description, refresh=False)
            bar.reset(total=total)
            return
        below_training = kind != "train" and "train" in self._bars
        self._bars[kind] = tqdm(
            desc=description,
            total=total,
            position=self.process_position + int(below_training),
            leave=leave,
            file=self._file if self._file is not None else sys.stderr,
            dynamic_ncols=True,
            smoothing=0,
            mininterval=0,
        )

    @override
    def _show(self, kind: str, n: int | None, metrics: dict[str, float | int | str]) -> None:
        bar = self._bars[kind]
        if n is not None:
            bar.n = n
        if metrics:
            bar.set_postfix(metrics, refresh=False)
        bar.refresh()

    @override
    def _finish(self, kind: str) -> None:
        bar = self._bars.pop(kind, None)
        if bar is not None:
            bar.close()


class RichProgressBar(ProgressBar):
    """A bar drawn with rich (``pip install rich``). ``console_kwargs`` go to ``rich.console.Console``."""

    def __init__(
        self,
        refresh_rate: int = 1,
        leave: bool = False,
        console_kwargs: dict[str, Any] | None = None,
        min_refresh_interval: float = 0.1,
    ) -> None:
        require("rich", "RichProgressBar")  # fail at construction, with the install line, not mid-run
        super().__init__(refresh_rate, leave, min_refresh_interval)
        self.console_kwargs = dict(console_kwargs or {})
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._transient: set[str] = set()

    @override
    def _start(self, kind: str, description: str, total: int | None, leave: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self._progress is None:
            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[metrics]}"),
                console=Console(**self.console_kwargs),
                auto_refresh=False,
            )
            self._progress.start()
        if kind in self._tasks:
            self._progress.reset(self._tasks[kind], total=total, description=description, metrics="")
        else:
            self._tasks[kind] = self._progress.add_task(description, total=total, metrics="")
        if not leave:
            self._transient.add(kind)

    @override
    def _show(self, kind: str, n: int | None, metrics: dict[str, float | int | str]) -> None:
        text = " ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in metrics.items())
        self._progress.update(self._tasks[kind], completed=n, metrics=text)
        self._progress.refresh()

    @override
    def _finish(self, kind: str) -> None:
        task = self._tasks.pop(kind, None)
        if task is not None and kind in self._transient:
            self._progress.remove_task(task)
        self._transient.discard(kind)
        if not self._tasks and self._progress is not None:
            self._progress.refresh()
            self._progress.stop()
            self._progress = None
