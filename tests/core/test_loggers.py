"""Core loggers: CSV and TensorBoard files read back, versions, rank-zero only, bad input."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from torchloom.core.errors import ConfigurationError, MissingDependencyError
from torchloom.core.loggers import CSVLogger, Logger, TensorBoardLogger
from torchloom.core.utils import imports, rank_zero


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def read_flat_yaml(path: Path) -> dict[str, Any]:
    """Our hparams.yaml is one `"key": value` per line; keys and strings are JSON, so JSON reads them back."""
    special = {".nan": math.nan, ".inf": math.inf, "-.inf": -math.inf}
    out: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or line == "{}":
            continue
        key, _, value = line.partition('": ')
        out[json.loads(key + '"')] = special[value] if value in special else json.loads(value)
    return out


def event_accumulator(log_dir: str) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def hparams_plugin_data(acc: Any) -> dict[str, Any]:
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    contents = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in contents.items()}


# ----------------------------------------------------------------------------------------------- CSV


def test_csv_rows_header_widening_step_counter_and_flush(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="exp", flush_every_n_steps=2)
    path = Path(logger.log_dir, "metrics.csv")
    assert logger.log_dir == str(tmp_path / "exp" / "version_0")

    logger.log_metrics({"loss": torch.tensor(1.5)})  # step 0 from the counter
    assert not path.exists(), "one buffered step must not be written yet"
    logger.log_metrics({"loss": 1.25})  # step 1, second buffered step -> flush
    assert read_csv(path) == (["step", "loss"], [{"step": "0", "loss": "1.5"}, {"step": "1", "loss": "1.25"}])

    logger.log_metrics({"loss": np.float32(1.0), "acc": torch.tensor([0.5])})  # type: ignore[dict-item]  # step 2, new column
    assert len(read_csv(path)[1]) == 2, "still buffered"
    logger.log_metrics({"acc": 0.75}, step=10)  # flush with a widened header
    header, rows = read_csv(path)
    assert header == ["step", "loss", "acc"]
    assert rows == [
        {"step": "0", "loss": "1.5", "acc": ""},
        {"step": "1", "loss": "1.25", "acc": ""},
        {"step": "2", "loss": "1.0", "acc": "0.5"},
        {"step": "10", "loss": "", "acc": "0.75"},
    ]

    logger.log_metrics({"loss": 0.5})  # counter continues after the explicit step: 11
    logger.log_metrics({"acc": 1.0}, step=11)  # same step, other key: same row
    logger.log_metrics({"acc": 0.9}, step=11)  # same step, repeated key: a new row
    logger.save()
    header, rows = read_csv(path)
    assert header == ["step", "loss", "acc"]
    assert rows[4:] == [{"step": "11", "loss": "0.5", "acc": "1.0"}, {"step": "11", "loss": "", "acc": "0.9"}]
    assert not list(path.parent.glob(".*.tmp")), "no temp file may be left behind"


def test_csv_finalize_flushes_and_values_round_trip_exactly(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    values = [0.1, 1 / 3, 1e-12, float(torch.tensor(2.0, dtype=torch.bfloat16)), 7]
    for value in values:
        logger.log_metrics({"x": value})
    assert not Path(logger.log_dir, "metrics.csv").exists()  # default flush_every_n_steps=100
    logger.finalize("success")
    _, rows = read_csv(Path(logger.log_dir, "metrics.csv"))
    assert [float(r["x"]) for r in rows] == [float(v) for v in values]
    assert [int(r["step"]) for r in rows] == list(range(len(values)))


def test_csv_explicit_version_continues_an_existing_file(tmp_path: Path) -> None:
    first = CSVLogger(tmp_path, version="run")
    first.log_metrics({"loss": 2.0})
    first.finalize()
    resumed = CSVLogger(tmp_path, version="run", flush_every_n_steps=1)
    resumed.log_metrics({"loss": 1.0}, step=1)
    resumed.log_metrics({"acc": 0.5}, step=2)
    header, rows = read_csv(Path(tmp_path, "torchloom_logs", "run", "metrics.csv"))
    assert header == ["step", "loss", "acc"]
    assert [(r["step"], r["loss"], r["acc"]) for r in rows] == [("0", "2.0", ""), ("1", "1.0", ""), ("2", "", "0.5")]


def test_csv_hparams_yaml(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    logger.log_hyperparams(
        {
            "lr": 1e-05,
            "big": 1e20,
            "optim": {"name": 'adam "w"\nv2', "betas": (0.9, 0.99), "nested": {"eps": 1e-8}},
            "flag": True,
            "none": None,
            "nan": math.nan,
            "path": Path("/data"),
        }
    )
    logger.log_hyperparams(argparse.Namespace(batch_size=32, lr=0.1))  # merges, overwriting lr
    path = Path(logger.log_dir, "hparams.yaml")
    assert read_flat_yaml(path) == {
        "lr": 0.1,
        "big": 1e20,
        "optim/name": 'adam "w"\nv2',
        "optim/betas": "(0.9, 0.99)",
        "optim/nested/eps": 1e-8,
        "flag": True,
        "none": None,
        "nan": pytest.approx(math.nan, nan_ok=True),
        "path": repr(Path("/data")),
        "batch_size": 32,
    }
    text = path.read_text()
    assert '"big": 1.0e+20' in text, "floats carry a dot so YAML 1.1 parsers read them as floats"
    assert logger.hyperparams["optim/nested/eps"] == 1e-8
    if imports.is_available("yaml"):
        import yaml  # type: ignore[import-untyped]

        assert yaml.safe_load(text)["optim/nested/eps"] == 1e-8


def test_csv_hparam_metrics_land_in_metrics_csv(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    logger.log_metrics({"loss": 1.0}, step=4)
    logger.log_hyperparams({"lr": 0.1}, metrics={"best_acc": torch.tensor(0.875)})
    logger.finalize()
    _, rows = read_csv(Path(logger.log_dir, "metrics.csv"))
    assert rows == [{"step": "4", "loss": "1.0", "best_acc": "0.875"}]


def test_buffered_rows_are_written_at_interpreter_exit(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from torchloom.core.loggers import CSVLogger
        logger = CSVLogger({str(tmp_path)!r})
        for step in range(3):
            logger.log_metrics({{"loss": 1.0 / (step + 1)}})
        # no save() or finalize(): the exit hook must write the buffered rows
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, env=env)
    _, rows = read_csv(tmp_path / "torchloom_logs" / "version_0" / "metrics.csv")
    assert [(r["step"], float(r["loss"])) for r in rows] == [("0", 1.0), ("1", 0.5), ("2", 1.0 / 3)]


# ------------------------------------------------------------------------------------------ versions


def test_versions_increment_and_explicit_versions(tmp_path: Path) -> None:
    (tmp_path / "logs" / "version_x").mkdir(parents=True)  # not a version folder
    (tmp_path / "logs" / "version_9").write_text("a file, not a folder")
    first = CSVLogger(tmp_path, name="logs")
    assert first.version == 0
    first.log_metrics({"a": 1.0})
    first.save()
    second = TensorBoardLogger(tmp_path, name="logs")
    assert second.version == 1
    second.log_metrics({"a": 1.0})
    second.finalize()
    assert CSVLogger(tmp_path, name="logs", version=5).log_dir == str(tmp_path / "logs" / "version_5")
    Path(CSVLogger(tmp_path, name="logs", version=5).log_dir).mkdir()
    assert CSVLogger(tmp_path, name="logs").version == 6
    named = CSVLogger(tmp_path, name="logs", version="baseline")
    assert named.version == "baseline"
    assert named.log_dir == str(tmp_path / "logs" / "baseline")
    assert CSVLogger(tmp_path / "fresh").version == 0
    assert not (tmp_path / "fresh").exists(), "resolving a version must not create folders"
    assert CSVLogger(tmp_path, name="").log_dir == str(tmp_path / "version_0")


def test_version_is_resolved_once(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    log_dir = logger.log_dir
    Path(log_dir).mkdir(parents=True)  # e.g. another logger took version_0 meanwhile
    assert logger.log_dir == log_dir


# -------------------------------------------------------------------------------------- rank zero


@pytest.mark.parametrize("logger_cls", [CSVLogger, TensorBoardLogger])
def test_non_zero_rank_writes_nothing_and_rank_is_read_at_call_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logger_cls: type[Logger]
) -> None:
    logger = logger_cls(tmp_path)  # built while the rank is still 0, as in a launching process
    monkeypatch.setattr(rank_zero, "_rank", 1)
    logger.log_hyperparams({"lr": 0.1}, metrics={"acc": 0.5})
    for step in range(3):
        logger.log_metrics({"loss": torch.tensor(float(step))})
    logger.save()
    logger.finalize("success")
    assert list(tmp_path.iterdir()) == []
    assert logger.hyperparams == {}
    if isinstance(logger, TensorBoardLogger):
        assert logger.experiment is None

    monkeypatch.setattr(rank_zero, "_rank", 0)  # the same object, now on rank 0
    logger.log_metrics({"loss": 1.0})
    logger.finalize()
    assert Path(logger.log_dir).is_dir()
    assert any(Path(logger.log_dir).iterdir())


# ------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", flush_secs=1)
    logger.log_metrics({"train/loss": torch.tensor(2.5), "lr": 0.1})
    logger.log_metrics({"train/loss": 1.5})
    logger.log_metrics({"train/loss": 0.5}, step=10)
    logger.save()
    acc = event_accumulator(logger.log_dir)
    assert set(acc.Tags()["scalars"]) == {"train/loss", "lr"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(0, 2.5), (1, 1.5), (10, 0.5)]
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("lr")] == [(0, pytest.approx(0.1))]
    logger.finalize()


def test_tensorboard_hparams_plugin_in_the_same_run(tmp_path: Path) -> None:
    from tensorboard.plugins.hparams import api_pb2, metadata

    logger = TensorBoardLogger(tmp_path)
    logger.log_hyperparams({"lr": 0.01, "model": {"depth": 4, "act": "relu"}, "amp": False, "seed": None})
    logger.log_hyperparams(argparse.Namespace(batch_size=64), metrics={"val/acc": 0.0})  # merged before any metric
    logger.log_metrics({"val/acc": 0.75}, step=3)
    with pytest.warns(UserWarning, match=r"'lr'.*HPARAMS"):
        logger.log_hyperparams({"lr": 0.5})  # too late for TensorBoard: warned, not silently lost
    logger.finalize("failed")

    acc = event_accumulator(logger.log_dir)
    data = hparams_plugin_data(acc)
    assert set(data) == {metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG}
    start = data[metadata.SESSION_START_INFO_TAG].session_start_info
    assert start.hparams["lr"].number_value == pytest.approx(0.01)
    assert start.hparams["model/depth"].number_value == 4
    assert start.hparams["model/act"].string_value == "relu"
    assert start.hparams["batch_size"].number_value == 64
    assert "seed" not in start.hparams  # None has no TensorBoard value
    experiment = data[metadata.EXPERIMENT_TAG].experiment
    assert {h.name for h in experiment.hparam_infos} == {"lr", "model/depth", "model/act", "amp", "batch_size"}
    assert [m.name.tag for m in experiment.metric_infos] == ["val/acc"]
    assert data[metadata.SESSION_END_INFO_TAG].session_end_info.status == api_pb2.STATUS_FAILURE
    # The hparam metric is a scalar of the same run, so the HPARAMS tab can show its latest value.
    assert [(e.step, e.value) for e in acc.Scalars("val/acc")] == [(0, 0.0), (3, 0.75)]
    assert logger.hyperparams["lr"] == 0.5


def test_tensorboard_logger_survives_pickling_to_a_worker(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path)
    logger.log_metrics({"a": 1.0})
    copy = pickle.loads(pickle.dumps(logger))
    assert copy.log_dir == logger.log_dir
    copy.log_metrics({"a": 2.0}, step=1)
    copy.finalize()
    logger.finalize()
    assert sorted(e.value for e in event_accumulator(logger.log_dir).Scalars("a")) == [1.0, 2.0]


@pytest.mark.parametrize("how", ["sys.modules", "is_available"])
def test_missing_tensorboard_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "sys.modules":
        monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes the package unimportable
    else:
        monkeypatch.setattr(imports, "is_available", lambda module: module != "tensorboard")
    with pytest.raises(MissingDependencyError, match=r"pip install 'torchloom-core\[tensorboard\]'"):
        TensorBoardLogger(tmp_path)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------- bad input


def test_non_scalar_tensor_is_rejected_with_its_name(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    with pytest.raises(ConfigurationError, match=r"'train/loss'.*shape \(2, 3\)"):
        logger.log_metrics({"ok": 1.0, "train/loss": torch.zeros(2, 3)})
    with pytest.raises(ConfigurationError, match=r"'acc'.*'high'"):
        logger.log_metrics({"acc": "high"})  # type: ignore[dict-item]
    logger.finalize()
    assert not Path(logger.log_dir, "metrics.csv").exists(), "a rejected call logs nothing"


def test_bad_arguments_name_the_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="-1"):
        CSVLogger(tmp_path, version=-1)
    with pytest.raises(ConfigurationError, match=r"flush_every_n_steps.*0"):
        CSVLogger(tmp_path, flush_every_n_steps=0)
    with pytest.raises(ConfigurationError, match="log_dir"):
        TensorBoardLogger(tmp_path, log_dir="elsewhere")
    logger = CSVLogger(tmp_path)
    with pytest.raises(ConfigurationError, match=r"step.*-3"):
        logger.log_metrics({"a": 1.0}, step=-3)
    with pytest.raises(ConfigurationError, match="'step'"):
        logger.log_metrics({"step": 1.0})
    with pytest.raises(ConfigurationError, match=r"'done'.*'success', 'failed', 'aborted'"):
        logger.finalize("done")
    with pytest.raises(ConfigurationError, match="list"):
        logger.log_hyperparams([("lr", 0.1)])  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
