"""Timer: elapsed time per stage, stopping at the budget, resume of the elapsed time."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from torchloom.core.errors import ConfigurationError
from torchloom.trainer.callbacks import Timer
from torchloom.trainer.callbacks import timer as timer_module
from torchloom.trainer.callbacks.timer import parse_duration

from .test_callbacks_fakes import FakeTrainer


class Clock:
    """A clock that advances one second per training batch (the fake trainer's hooks tick it)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(timer_module, "_clock", fake)
    return fake


class Ticker:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def __getattr__(self, name: str) -> object:
        if name == "on_train_batch_start":
            return lambda *args: setattr(self.clock, "now", self.clock.now + 1.0)
        if name.startswith("on_") or name in ("setup", "teardown"):
            return lambda *args: None
        raise AttributeError(name)


def test_stops_when_the_budget_is_used_up(tmp_path: Path, clock: Clock) -> None:
    timer = Timer(duration=timedelta(seconds=5), verbose=False)
    trainer = FakeTrainer(tmp_path, [Ticker(clock), timer], num_val_batches=[])
    trainer.fit([None] * 10, steps_per_epoch=2)
    assert trainer.should_stop and trainer.global_step == 5 and trainer.current_epoch == 2
    assert timer.time_elapsed("train") == 5.0 and timer.time_remaining() == 0.0
    assert timer.start_time("train") == 100.0 and timer.end_time("train") == 105.0


def test_epoch_interval_checks_at_epoch_end(tmp_path: Path, clock: Clock, capsys: pytest.CaptureFixture[str]) -> None:
    timer = Timer(duration="00:00:00:03", interval="epoch")
    trainer = FakeTrainer(tmp_path, [Ticker(clock), timer], num_val_batches=[])
    trainer.fit([None] * 10, steps_per_epoch=2)
    assert trainer.global_step == 4  # 3 s passed during epoch 1; the check comes at its end
    assert "Time limit of 0:00:03 reached" in capsys.readouterr().out


def test_stage_times(tmp_path: Path, clock: Clock) -> None:
    timer = Timer()
    trainer = FakeTrainer(tmp_path, [timer])
    assert timer.time_elapsed("validate") == 0.0 and timer.start_time("test") is None
    trainer.call("on_validation_start")
    clock.now += 2.5
    assert timer.time_elapsed("validate") == 2.5  # running: measured up to now
    trainer.call("on_validation_end")
    clock.now += 10
    assert timer.time_elapsed("validate") == 2.5
    trainer.call("on_test_start")
    clock.now += 1
    trainer.call("on_test_end")
    assert timer.time_elapsed("test") == 1.0 and timer.time_remaining() is None
    with pytest.raises(ConfigurationError, match=r"stage 'fit'.*'train', 'validate', 'test', 'predict'"):
        timer.time_elapsed("fit")


def test_elapsed_time_survives_a_resume(tmp_path: Path, clock: Clock) -> None:
    first = Timer(duration={"seconds": 6}, verbose=False)
    FakeTrainer(tmp_path, [Ticker(clock), first], num_val_batches=[]).fit([None, None], steps_per_epoch=2)
    state = first.state_dict()
    assert state["time_elapsed"]["train"] == 4.0
    resumed = Timer(duration={"seconds": 6}, verbose=False)
    resumed.load_state_dict(state)
    trainer = FakeTrainer(tmp_path, [Ticker(clock), resumed], num_val_batches=[])
    trainer.fit([None] * 5, steps_per_epoch=2)
    assert trainer.global_step == 2 and resumed.time_elapsed() == 6.0

    spent = Timer(duration={"seconds": 3}, verbose=False)
    spent.load_state_dict(state)
    trainer = FakeTrainer(tmp_path, [spent], num_val_batches=[])
    trainer.call("on_train_start")
    assert trainer.should_stop  # stops before the first step


def test_durations() -> None:
    assert parse_duration("01:02:03:04") == timedelta(days=1, hours=2, minutes=3, seconds=4)
    assert parse_duration({"minutes": 1.5}) == timedelta(seconds=90)
    assert Timer("00:00:01:00").duration == 60.0
    with pytest.raises(ConfigurationError, match="'DD:HH:MM:SS'"):
        Timer(duration="1h")
    with pytest.raises(ConfigurationError, match="timedelta keywords"):
        Timer(duration={"hourz": 1})
    with pytest.raises(ConfigurationError, match="negative"):
        Timer(duration=timedelta(seconds=-1))
    with pytest.raises(ConfigurationError, match=r"interval='batch'.*'step', 'epoch'"):
        Timer(interval="batch")
