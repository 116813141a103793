"""Trainer loop arguments: defaults, normalisation, and the errors for bad values (config.py)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from torchloom.core.errors import ConfigurationError
from torchloom.core.loggers.csv import CSVLogger
from torchloom.trainer.callbacks import Callback
from torchloom.trainer.config import DEFAULT_MAX_EPOCHS, parse_callbacks, parse_config, parse_loggers, parse_max_time


def test_defaults_are_the_documented_ones() -> None:
    config = parse_config()
    assert config.max_epochs == DEFAULT_MAX_EPOCHS == 1000
    assert (config.min_epochs, config.max_steps, config.min_steps) == (0, -1, 0)
    assert config.limit_train_batches == config.limit_val_batches == 1.0
    assert config.val_check_interval == 1.0 and config.check_val_every_n_epoch == 1
    assert config.num_sanity_val_steps == 2 and config.log_every_n_steps == 50
    assert config.accumulate_grad_batches == 1 and config.gradient_clip_val is None
    assert config.gradient_clip_algorithm == "norm"
    assert config.enable_checkpointing and config.enable_progress_bar and config.enable_model_summary
    assert config.deterministic is None and config.benchmark is None and config.fast_dev_run == 0
    assert config.inference_mode and config.use_distributed_sampler and not config.barebones


def test_max_epochs_none_means_unbounded_when_max_steps_is_set() -> None:
    assert parse_config(max_steps=10).max_epochs == -1
    assert parse_config(max_steps=10, max_epochs=3).max_epochs == 3
    assert parse_config(max_epochs=-1).max_epochs == -1


def test_float_limits_are_fractions_and_ints_are_counts() -> None:
    config = parse_config(limit_train_batches=0.25, limit_val_batches=3, limit_test_batches=0, limit_predict_batches=1)
    assert config.limit_train_batches == 0.25 and isinstance(config.limit_train_batches, float)
    assert config.limit_val_batches == 3 and isinstance(config.limit_val_batches, int)
    assert config.limit_test_batches == 0 and config.limit_predict_batches == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("00:01:30:05", datetime.timedelta(hours=1, minutes=30, seconds=5)),
        ("2:00:00:00", datetime.timedelta(days=2)),
        (datetime.timedelta(minutes=3), datetime.timedelta(minutes=3)),
        ({"hours": 1, "seconds": 2}, datetime.timedelta(hours=1, seconds=2)),
        (None, None),
    ],
)
def test_max_time_forms(value: Any, expected: datetime.timedelta | None) -> None:
    assert parse_max_time(value) == expected


@pytest.mark.parametrize("value", ["1:00:00", "a:b:c:d", {"weeks": 1}, 5, "00:00:00:00"])
def test_bad_max_time_names_the_forms(value: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"max_time=.*Valid: 'DD:HH:MM:SS'"):
        parse_max_time(value)


def test_fast_dev_run_sets_one_short_epoch_without_sanity_check_or_checkpoints() -> None:
    config = parse_config(fast_dev_run=True, max_epochs=7)
    assert (config.fast_dev_run, config.max_epochs, config.max_steps, config.num_sanity_val_steps) == (1, 1, 1, 0)
    assert config.limit_train_batches == config.limit_val_batches == config.limit_test_batches == 1
    assert not config.enable_checkpointing
    assert parse_config(fast_dev_run=3).limit_predict_batches == 3
    assert parse_config(fast_dev_run=False).fast_dev_run == 0


def test_barebones_turns_the_extras_off_and_refuses_to_turn_them_on() -> None:
    config = parse_config(barebones=True)
    assert not (config.enable_checkpointing or config.enable_progress_bar or config.enable_model_summary)
    with pytest.raises(ConfigurationError, match=r"barebones=True.*enable_progress_bar=True"):
        parse_config(barebones=True, enable_progress_bar=True)
    with pytest.raises(ConfigurationError, match="log_every_n_steps=5"):
        parse_config(barebones=True, log_every_n_steps=5)
    with pytest.raises(ConfigurationError, match="detect_anomaly=True"):
        parse_config(barebones=True, detect_anomaly=True)


def test_clip_settings() -> None:
    assert parse_config(gradient_clip_val=0).gradient_clip_val is None  # 0 means no clipping
    assert parse_config(gradient_clip_val=2, gradient_clip_algorithm="VALUE").gradient_clip_algorithm == "value"
    with pytest.raises(ConfigurationError, match=r"gradient_clip_algorithm='max'.*'norm', 'value'"):
        parse_config(gradient_clip_algorithm="max")
    with pytest.raises(ConfigurationError, match="gradient_clip_val=-1"):
        parse_config(gradient_clip_val=-1)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"max_epochs": -2}, r"max_epochs=-2 is not valid. Valid: an int >= -1"),
        ({"max_epochs": 2.5}, r"max_epochs=2.5"),
        ({"max_steps": True}, r"max_steps=True"),
        ({"min_epochs": 3, "max_epochs": 2}, r"min_epochs=3 is larger than max_epochs=2"),
        ({"min_steps": 5, "max_steps": 2}, r"min_steps=5 is larger than max_steps=2"),
        ({"limit_train_batches": 1.5}, r"limit_train_batches=1.5 is not valid. Valid: a float fraction"),
        ({"limit_val_batches": -1}, r"limit_val_batches=-1"),
        ({"limit_test_batches": "all"}, r"limit_test_batches='all'"),
        ({"val_check_interval": 0.0}, r"val_check_interval=0.0"),
        ({"val_check_interval": 0}, r"val_check_interval=0"),
        ({"check_val_every_n_epoch": 0}, r"check_val_every_n_epoch=0"),
        ({"check_val_every_n_epoch": None, "val_check_interval": 0.5}, r"check_val_every_n_epoch=None needs an int"),
        ({"num_sanity_val_steps": -2}, r"num_sanity_val_steps=-2 is not valid. Valid: an int >= -1"),
        ({"log_every_n_steps": 0}, r"log_every_n_steps=0"),
        ({"accumulate_grad_batches": 0}, r"accumulate_grad_batches=0 is not valid. Valid: an int >= 1"),
        ({"reload_dataloaders_every_n_epochs": -1}, r"reload_dataloaders_every_n_epochs=-1"),
        ({"deterministic": "yes"}, r"deterministic='yes' is not valid. Valid: True, False, 'warn', None"),
        ({"benchmark": "fast"}, r"benchmark='fast'"),
        ({"fast_dev_run": -1}, r"fast_dev_run=-1"),
        ({"inference_mode": 1}, r"inference_mode=1 is not valid. Valid: True, False"),
        ({"enable_checkpointing": "no"}, r"enable_checkpointing='no'"),
    ],
)
def test_bad_values_name_the_value_and_the_valid_choices(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigurationError, match=pattern):
        parse_config(**kwargs)


def test_loggers(tmp_path: Any) -> None:
    config = parse_config(default_root_dir=tmp_path)
    (default,) = parse_loggers(None, config)
    assert default.root_dir == str(tmp_path)  # TensorBoard when installed, CSV otherwise
    assert parse_loggers(False, config) == []
    csv = CSVLogger(tmp_path)
    assert parse_loggers(csv, config) == [csv] and parse_loggers([csv], config) == [csv]
    assert parse_loggers(csv, parse_config(fast_dev_run=True)) == []
    with pytest.raises(ConfigurationError, match="logger='csv' is not valid"):
        parse_loggers("csv", config)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="barebones=True runs without loggers"):
        parse_loggers(csv, parse_config(barebones=True))


def test_callbacks() -> None:
    callback = Callback()
    assert parse_callbacks(None) == [] and parse_callbacks(callback) == [callback]
    assert parse_callbacks([callback]) == [callback]
    with pytest.raises(ConfigurationError, match="is not a Callback"):
        parse_callbacks([callback, "progress"])  # type: ignore[list-item]
