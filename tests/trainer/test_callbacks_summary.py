"""ModelSummary: the numbers in the table and when it is printed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.errors import ConfigurationError
from torchloom.trainer.callbacks import ModelSummary
from torchloom.trainer.callbacks.summary import summarize

from .test_callbacks_fakes import FakeTrainer
from .test_callbacks_progress import RankOneStrategy


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))  # 220 + 105
        self.norm = nn.BatchNorm1d(5)  # 10 parameters (+ buffers, not counted)
        self.head = nn.Linear(5, 2, bias=False).to(torch.float64)  # 10 float64 parameters
        self.norm.requires_grad_(False)
        self.head.eval()


def test_counts_depth_and_size() -> None:
    summary = summarize(Net(), max_depth=1)
    assert [(s.name, s.type, s.params, s.training) for s in summary.layers] == [
        ("encoder", "Sequential", 325, True),
        ("norm", "BatchNorm1d", 10, True),
        ("head", "Linear", 10, False),
    ]
    assert (summary.trainable, summary.non_trainable, summary.total) == (335, 10, 345)
    assert summary.size_mb == pytest.approx((335 * 4 + 10 * 8) / 1e6)
    deep = summarize(Net(), max_depth=-1)
    assert [s.name for s in deep.layers] == ["encoder", "encoder.0", "encoder.1", "encoder.2", "norm", "head"]
    assert deep.layers[1].params == 220
    assert summarize(Net(), max_depth=0).layers == []


def test_shared_and_lazy_parameters_are_counted_once_or_not_at_all() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, shared, nn.LazyLinear(4))
    summary = summarize(model)
    assert summary.total == 12
    assert [(s.name, s.params) for s in summary.layers] == [("0", 12), ("2", 0)]  # a shared layer is listed once


def test_table_text() -> None:
    text = str(summarize(Net()))
    lines = text.splitlines()
    assert lines[0].split() == ["|", "Name", "|", "Type", "|", "Params", "|", "Mode"]
    assert lines[2].split() == ["0", "|", "encoder", "|", "Sequential", "|", "325", "|", "train"]
    assert lines[4].split()[-1] == "eval"
    assert "335      Trainable params" in text and "10       Non-trainable params" in text
    assert "345      Total params" in text and "0.001    Total estimated model params size (MB)" in text
    big = nn.Linear(1000, 1500)
    assert "1.5 M    Total params" in str(summarize(big))


def test_printed_at_fit_start_on_rank_zero_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trainer = FakeTrainer(tmp_path, [ModelSummary()])
    trainer.module = Net()
    trainer.call("on_fit_start")
    assert "Total params" in capsys.readouterr().out
    other = FakeTrainer(tmp_path, [ModelSummary()], strategy=RankOneStrategy("cpu", accelerator=CPUAccelerator()))
    other.call("on_fit_start")
    assert capsys.readouterr().out == ""


def test_bad_depth() -> None:
    with pytest.raises(ConfigurationError, match="max_depth=-2"):
        ModelSummary(max_depth=-2)
