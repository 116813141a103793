"""Progress bars: what they draw (captured from a StringIO), how often, and when they draw nothing."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from typing_extensions import override

from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.errors import ConfigurationError, MissingDependencyError
from torchloom.core.strategies.single_device import SingleDeviceStrategy
from torchloom.trainer.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from .test_callbacks_fakes import FakeTrainer


class RankOneStrategy(SingleDeviceStrategy):
    @property
    @override
    def global_rank(self) -> int:
        return 1


class VersionedLogger:
    version = 7

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


def fit_with(tmp_path: Path, bar: ProgressBar, epochs: int = 2, **kwargs: object) -> FakeTrainer:
    trainer = FakeTrainer(tmp_path, [bar], **kwargs)  # type: ignore[arg-type]
    trainer.progress_bar_metrics = {"acc": torch.tensor(0.875)}
    trainer.fit([1.0] * epochs, steps_per_epoch=4)
    return trainer


def frames(buffer: io.StringIO) -> list[str]:
    """Every state the bar was drawn in (tqdm separates redraws with carriage returns)."""
    return [f.strip() for f in buffer.getvalue().replace("\n", "\r").split("\r") if f.strip()]


def test_tqdm_shows_epoch_counts_loss_and_prog_bar_metrics(tmp_path: Path) -> None:
    out = io.StringIO()
    fit_with(tmp_path, TQDMProgressBar(file=out, min_refresh_interval=0), loggers=[VersionedLogger()])
    shown = frames(out)
    last_epoch_1 = [f for f in shown if f.startswith("Epoch 1") and "4/4" in f][-1]
    assert "loss=0.5" in last_epoch_1 and "acc=0.875" in last_epoch_1 and "v_num=7" in last_epoch_1
    assert any(f.startswith("Epoch 0") and "1/4" in f for f in shown)
    assert any(f.startswith("Validation") and "2/2" in f for f in shown)


def test_a_reused_training_bar_never_counts_backwards_within_an_epoch(tmp_path: Path) -> None:
    out = io.StringIO()
    fit_with(tmp_path, TQDMProgressBar(file=out, min_refresh_interval=0), epochs=3)
    counts: dict[str, list[int]] = {}
    for frame in frames(out):
        if frame.startswith("Epoch "):
            epoch, rest = frame.split(":", 1)
            counts.setdefault(epoch, []).append(int(rest.split("|")[2].split("/")[0]))
    assert list(counts) == ["Epoch 0", "Epoch 1", "Epoch 2"]
    # a reset drawn before the new description would show "Epoch 0 ... 0/4" after "Epoch 0 ... 4/4"
    assert all(seen == sorted(seen) for seen in counts.values()), counts


def test_refresh_rate_and_time_throttle(tmp_path: Path) -> None:
    every_other = io.StringIO()
    fit_with(tmp_path, TQDMProgressBar(refresh_rate=2, file=every_other, min_refresh_interval=0), epochs=1)
    drawn = [f for f in frames(every_other) if f.startswith("Epoch 0")]
    assert any("2/4" in f for f in drawn) and any("4/4" in f for f in drawn)
    assert not any("1/4" in f or "3/4" in f for f in drawn)

    throttled = io.StringIO()
    fit_with(tmp_path, TQDMProgressBar(file=throttled, min_refresh_interval=3600), epochs=1)
    drawn = [f for f in frames(throttled) if f.startswith("Epoch 0")]
    assert any("1/4" in f for f in drawn) and any("4/4" in f for f in drawn)  # the first and last always
    assert not any(f"{n}/4" in f for f in drawn for n in (2, 3))


def test_disabled_bars_and_other_ranks_write_nothing(tmp_path: Path) -> None:
    off = io.StringIO()
    fit_with(tmp_path, TQDMProgressBar(refresh_rate=0, file=off))
    assert off.getvalue() == ""
    other_rank = io.StringIO()
    strategy = RankOneStrategy("cpu", accelerator=CPUAccelerator())
    fit_with(tmp_path, TQDMProgressBar(file=other_rank, min_refresh_interval=0), strategy=strategy)
    assert other_rank.getvalue() == ""
    manual = TQDMProgressBar(file=io.StringIO())
    manual.disable()
    assert not manual.is_enabled
    manual.enable()
    assert manual.is_enabled


def test_test_and_predict_bars_and_several_dataloaders(tmp_path: Path) -> None:
    out = io.StringIO()
    bar = TQDMProgressBar(file=out, min_refresh_interval=0)
    trainer = FakeTrainer(tmp_path, [bar])
    trainer.num_test_batches = [3, 2]
    trainer.num_predict_batches = [2]
    trainer.state.fn = "test"
    trainer.call("setup", "test")
    for loader, count in enumerate(trainer.num_test_batches):
        for i in range(count):
            trainer.call("on_test_batch_start", None, i, loader)
            trainer.call("on_test_batch_end", None, None, i, loader)
    trainer.call("on_test_end")
    trainer.state.fn = "predict"
    for i in range(2):
        trainer.call("on_predict_batch_start", None, i, 0)
        trainer.call("on_predict_batch_end", None, None, i, 0)
    trainer.call("on_predict_end")
    shown = frames(out)
    assert any(f.startswith("Testing DataLoader 0") and "3/3" in f for f in shown)
    assert any(f.startswith("Testing DataLoader 1") and "2/2" in f for f in shown)
    assert any(f.startswith("Predicting") and "2/2" in f for f in shown)


def test_get_metrics_reads_values_only_when_asked(tmp_path: Path) -> None:
    bar = TQDMProgressBar(file=io.StringIO())
    trainer = FakeTrainer(tmp_path, [bar])
    trainer.progress_bar_metrics = {"acc": torch.tensor(0.5)}
    trainer.call("on_train_batch_end", torch.tensor(2.0, requires_grad=True) * 1, None, 0)
    assert bar.get_metrics(trainer, trainer.module) == {"loss": 2.0, "acc": 0.5}  # type: ignore[arg-type]
    trainer.call("on_train_batch_end", None, None, 1)  # manual optimization: no loss returned
    assert bar.get_metrics(trainer, trainer.module)["loss"] == 2.0  # type: ignore[arg-type]


def test_rich_bar_draws_to_its_console(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    out = io.StringIO()
    bar = RichProgressBar(console_kwargs={"file": out, "width": 120, "force_terminal": False}, min_refresh_interval=0)
    fit_with(tmp_path, bar, epochs=1)
    text = out.getvalue()
    assert "Epoch 0" in text and "4/4" in text and "loss: 0.5" in text and "acc: 0.875" in text


def test_rich_missing_names_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)
    with pytest.raises(MissingDependencyError, match="pip install rich"):
        RichProgressBar()


def test_bad_arguments() -> None:
    with pytest.raises(ConfigurationError, match="refresh_rate=-1"):
        TQDMProgressBar(refresh_rate=-1)
    with pytest.raises(ConfigurationError, match="min_refresh_interval=-1"):
        TQDMProgressBar(min_refresh_interval=-1)


def test_sanity_check_bar_counts_the_sanity_batches(tmp_path: Path) -> None:
    out = io.StringIO()
    trainer = FakeTrainer(tmp_path, [TQDMProgressBar(file=out, min_refresh_interval=0)], num_val_batches=[5])
    trainer.sanity_checking = True
    for i in range(2):
        trainer.call("on_validation_batch_start", None, i, 0)
        trainer.call("on_validation_batch_end", None, None, i, 0)
    trainer.call("on_validation_end")
    assert any(f.startswith("Sanity Checking") and "2/2" in f for f in frames(out))
