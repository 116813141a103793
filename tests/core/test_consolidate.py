"""consolidate(): a sharded checkpoint -> one weights_only-loadable file (two-rank checkpoints: test_fsdp_multiprocess)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.core.test_sharded_checkpoint import Alone
from torchloom.core.checkpoint.consolidate import consolidate
from torchloom.core.checkpoint.distributed import (
    optimizer_state_to_named,
    parameter_names,
    save_sharded,
)
from torchloom.core.errors import ConfigurationError


def sharded_checkpoint(path: Path) -> tuple[nn.Linear, torch.optim.Optimizer]:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    named = optimizer_state_to_named(optimizer.state_dict(), parameter_names(model, optimizer))
    state = {"model": model.state_dict(), "optimizers": [named], "epoch": 1}
    save_sharded(path, state, {"model": "module", "optimizers": "optimizers", "epoch": "data"}, Alone())
    return model, optimizer


def test_consolidate_writes_a_plain_checkpoint(tmp_path: Path) -> None:
    model, optimizer = sharded_checkpoint(tmp_path / "ckpt")
    written = consolidate(tmp_path / "ckpt", tmp_path / "out" / "model.pt")
    assert written == tmp_path / "out" / "model.pt"
    loaded = torch.load(written, weights_only=True)
    assert loaded["epoch"] == 1
    plain = nn.Linear(3, 2)
    plain.load_state_dict(loaded["model"])
    assert torch.equal(plain.weight, model.weight)
    fresh = torch.optim.AdamW(plain.parameters())
    fresh.load_state_dict(loaded["optimizers"][0])
    assert fresh.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert torch.equal(fresh.state[plain.weight]["exp_avg"], optimizer.state[model.weight]["exp_avg"])


def test_consolidate_refuses_bad_paths(tmp_path: Path) -> None:
    sharded_checkpoint(tmp_path / "ckpt")
    (tmp_path / "plain").mkdir()
    (tmp_path / "exists.pt").write_bytes(b"keep")
    with pytest.raises(ConfigurationError, match=r"CHECKPOINT_DIR '.*missing' is not a directory"):
        consolidate(tmp_path / "missing", tmp_path / "x.pt")
    with pytest.raises(ConfigurationError, match=r"CHECKPOINT_DIR '.*plain' is not a torchloom sharded checkpoint"):
        consolidate(tmp_path / "plain", tmp_path / "x.pt")
    with pytest.raises(ConfigurationError, match=r"OUTPUT_FILE '.*plain' is a directory"):
        consolidate(tmp_path / "ckpt", tmp_path / "plain")
    with pytest.raises(ConfigurationError, match=r"OUTPUT_FILE '.*exists.pt' exists already.*overwrite=True"):
        consolidate(tmp_path / "ckpt", tmp_path / "exists.pt")
    assert (tmp_path / "exists.pt").read_bytes() == b"keep"
    consolidate(tmp_path / "ckpt", tmp_path / "exists.pt", overwrite=True)
    assert torch.load(tmp_path / "exists.pt", weights_only=True)["epoch"] == 1
