"""EarlyStopping: patience, min_delta, thresholds, non-finite values, missing keys, state."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from torchloom.core.errors import ConfigurationError
from torchloom.trainer.callbacks import EarlyStopping

from .test_callbacks_fakes import FakeTrainer


def run(tmp_path: Path, callback: EarlyStopping, scores: list[float], **kwargs: object) -> FakeTrainer:
    trainer = FakeTrainer(tmp_path, [callback], **kwargs)  # type: ignore[arg-type]
    trainer.fit(scores)
    return trainer


def test_patience_counts_checks_without_improvement(tmp_path: Path) -> None:
    stopper = EarlyStopping("val_loss", patience=2)
    trainer = run(tmp_path, stopper, [3.0, 2.0, 2.5, 2.1, 1.0, 0.5])
    assert trainer.should_stop and trainer.current_epoch == 3 and stopper.stopped_epoch == 3
    assert stopper.best_score == 2.0 and stopper.wait_count == 2
    assert stopper.stopping_reason is not None and "did not improve" in stopper.stopping_reason


def test_improvement_resets_the_wait_and_fit_runs_to_the_end(tmp_path: Path) -> None:
    stopper = EarlyStopping("val_loss", patience=2)
    trainer = run(tmp_path, stopper, [3.0, 3.5, 2.0, 2.5, 1.0])
    assert not trainer.should_stop and trainer.current_epoch == 4 and stopper.wait_count == 0


def test_min_delta_and_max_mode(tmp_path: Path) -> None:
    stopper = EarlyStopping("acc", mode="max", min_delta=0.1, patience=1)
    trainer = FakeTrainer(tmp_path, [stopper])
    trainer.fit([0.5, 0.55, 0.9], metric="acc")  # +0.05 is not an improvement by more than 0.1
    assert trainer.should_stop and trainer.current_epoch == 1 and stopper.best_score == 0.5


def test_patience_zero_stops_at_the_first_check_without_improvement() -> None:
    stopper = EarlyStopping("m", patience=0)
    assert stopper.evaluate(1.0) is None
    assert stopper.evaluate(1.0) is not None


def test_stopping_and_divergence_thresholds() -> None:
    reached = EarlyStopping("m", stopping_threshold=0.1, patience=100)
    assert reached.evaluate(0.5) is None
    assert "stopping threshold" in (reached.evaluate(0.05) or "")
    diverged = EarlyStopping("m", divergence_threshold=10.0, patience=100)
    assert diverged.evaluate(9.0) is None
    assert "diverged" in (diverged.evaluate(11.0) or "")
    up = EarlyStopping("acc", mode="max", stopping_threshold=0.9, divergence_threshold=0.1)
    assert up.evaluate(0.5) is None and "threshold" in (up.evaluate(0.95) or "")
    assert "diverged" in (EarlyStopping("acc", mode="max", divergence_threshold=0.1).evaluate(0.05) or "")


def test_non_finite_values(tmp_path: Path) -> None:
    stopper = EarlyStopping("val_loss", patience=5)
    trainer = run(tmp_path, stopper, [1.0, math.nan, 0.5])
    assert trainer.should_stop and trainer.current_epoch == 1
    assert "not finite" in (stopper.stopping_reason or "")
    lenient = EarlyStopping("val_loss", patience=5, check_finite=False)
    assert lenient.evaluate(math.inf) is None and lenient.wait_count == 1  # only a value that does not improve
    assert lenient.evaluate(math.nan) is None and lenient.wait_count == 2


def test_checks_at_train_epoch_end_without_validation(tmp_path: Path) -> None:
    stopper = EarlyStopping("loss", patience=1)
    trainer = FakeTrainer(tmp_path, [stopper], num_val_batches=[])
    trainer.fit([1.0, 1.0, 0.5], metric="loss")
    assert trainer.should_stop and trainer.current_epoch == 1


def test_no_checks_in_sanity_check_or_outside_fit(tmp_path: Path) -> None:
    stopper = EarlyStopping("val_loss", patience=0)
    trainer = FakeTrainer(tmp_path, [stopper])
    trainer.sanity_checking = True
    trainer.validate_once(1.0)
    trainer.validate_once(2.0)
    trainer.sanity_checking = False
    trainer.state.fn = "validate"
    trainer.validate_once(3.0)
    assert not trainer.should_stop and stopper.best_score == math.inf


def test_missing_monitor_is_an_error_listing_the_logged_keys(tmp_path: Path) -> None:
    trainer = FakeTrainer(tmp_path, [EarlyStopping("val_acc")])
    with pytest.raises(ConfigurationError, match=r"monitor='val_acc'.*'val_loss'"):
        trainer.fit([1.0])
    lenient = FakeTrainer(tmp_path, [EarlyStopping("val_acc", strict=False)])
    with pytest.warns(UserWarning, match="val_acc"):
        lenient.fit([1.0])
    assert not lenient.should_stop


def test_state_round_trip_resumes_the_wait(tmp_path: Path) -> None:
    stopper = EarlyStopping("val_loss", patience=3)
    run(tmp_path, stopper, [1.0, 2.0, 2.0])
    assert stopper.state_dict() == {"wait_count": 2, "stopped_epoch": 0, "best_score": 1.0, "patience": 3}
    resumed = EarlyStopping("val_loss", patience=3)
    resumed.load_state_dict(stopper.state_dict())
    trainer = FakeTrainer(tmp_path, [resumed])
    trainer.current_epoch = 3
    trainer.fit([1.5, 0.1])
    assert trainer.should_stop and resumed.stopped_epoch == 3
    assert EarlyStopping("a").state_key != EarlyStopping("b").state_key != EarlyStopping("b", mode="max").state_key


def test_verbose_reports_on_rank_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(tmp_path, EarlyStopping("val_loss", patience=0, verbose=True), [1.0, 1.0])
    assert "EarlyStopping at epoch 1: val_loss did not improve" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"monitor": "m", "mode": "down"}, r"mode='down'.*'min', 'max'"),
        ({"monitor": "m", "patience": -1}, "patience=-1"),
        ({"monitor": "m", "min_delta": -0.1}, "min_delta=-0.1"),
        ({"monitor": ""}, "monitor=''"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        EarlyStopping(**kwargs)  # type: ignore[arg-type]
