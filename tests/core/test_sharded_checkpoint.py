"""The sharded checkpoint format (checkpoint/distributed.py) in one process, without a process group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from torchloom.core.checkpoint import distributed as sharded_io
from torchloom.core.errors import ConfigurationError


class Alone:
    """The coordinator of a job of one: rank 0, nothing to wait for."""

    is_global_zero = True

    def barrier(self, name: str | None = None) -> None:
        pass

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision


def adam_state() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    groups: list[dict[str, Any]] = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}]
    optimizer = torch.optim.Adam(groups)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_split_and_join_keep_the_structure() -> None:
    state = {"a": {"w": torch.ones(2), 3: [torch.zeros(1), "text", (torch.arange(2), None)]}, "n": 4}
    tensors: dict[str, torch.Tensor] = {}
    paths: list[Any] = []
    skeleton = sharded_io._split(state, [], tensors, paths)
    assert sorted(tensors) == ["a/3/0", "a/3/2/0", "a/w"] and paths == [["a", "w"], ["a", 3, 0], ["a", 3, 2, 0]]
    assert skeleton == {"a": {"w": None, 3: [None, "text", (None, None)]}, "n": 4}
    joined = sharded_io._join(skeleton, [], tensors, {sharded_io.flat_key(p) for p in paths})
    assert joined["n"] == 4 and isinstance(joined["a"][3][2], tuple) and joined["a"][3][1] == "text"
    assert torch.equal(joined["a"][3][2][0], torch.arange(2)) and torch.equal(joined["a"]["w"], torch.ones(2))
    partial = sharded_io._join(skeleton, [], {"a/3/0": torch.zeros(1)}, {"a/w", "a/3/0"})
    assert "w" not in partial["a"]  # a tensor that was not loaded is left out of its dict
    with pytest.raises(ConfigurationError, match="same key 'a/1'"):
        sharded_io._split({"a": {"1": torch.ones(1), 1: torch.ones(1)}}, [], {}, [])


def test_optimizer_state_forms_round_trip() -> None:
    model, optimizer = adam_state()
    indexed = optimizer.state_dict()
    names = sharded_io.parameter_names(model, optimizer)
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    named = sharded_io.optimizer_state_to_named(indexed, names)
    assert sorted(named["state"]) == sorted(names) and named["param_groups"][1]["params"] == ["2.weight", "2.bias"]
    assert not sharded_io.is_indexed_optimizer_state(named) and sharded_io.is_indexed_optimizer_state(indexed)
    back = sharded_io.optimizer_state_to_indexed(named)
    assert back["param_groups"] == indexed["param_groups"] and back["state"].keys() == indexed["state"].keys()
    with pytest.raises(ConfigurationError, match="holds 4 parameters but the optimizer has 3"):
        sharded_io.optimizer_state_to_named(indexed, names[:3])
    with pytest.raises(ConfigurationError, match="does not hold all the parameters"):
        sharded_io.parameter_names(nn.Linear(1, 1), optimizer)


def test_what_the_state_holds() -> None:
    model, optimizer = adam_state()
    state = {
        "model": model,
        "opt": optimizer,
        "opts": [optimizer],
        "sched": torch.optim.lr_scheduler.StepLR(optimizer, 1),
    }
    state["data"] = {"x": 1}
    kinds = sharded_io.kinds_of(state)
    assert kinds == {"model": "module", "opt": "optimizer", "opts": "optimizers", "sched": "object", "data": "data"}
    assert sharded_io.as_optimizers([]) is None and sharded_io.owner_of(optimizer, state, "opt") is model
    with pytest.raises(ConfigurationError, match=r"optimizer under 'opt' needs its module.*\['opt'\]"):
        sharded_io.owner_of(optimizer, {"opt": optimizer}, "opt")
    with pytest.raises(RuntimeError, match=r"missing keys \['2.bias'\], unexpected keys \['extra'\]"):
        sharded_io.check_module_keys(model, ["0.weight", "0.bias", "2.weight", "extra"], strict=True)
    sharded_io.check_module_keys(model, ["extra"], strict=False)


def test_save_and_load_without_a_process_group(tmp_path: Path) -> None:
    model, optimizer = adam_state()
    named = sharded_io.optimizer_state_to_named(optimizer.state_dict(), sharded_io.parameter_names(model, optimizer))
    state = {"model": model.state_dict(), "optimizer": named, "step": 7, "notes": ("a", torch.tensor(2.0))}
    kinds = {"model": "module", "optimizer": "optimizer", "step": "data", "notes": "data"}
    path = tmp_path / "ckpt"
    sharded_io.save_sharded(path, state, kinds, Alone())
    assert sharded_io.is_sharded_checkpoint(path) and not sharded_io.is_sharded_checkpoint(tmp_path)
    meta = torch.load(path / sharded_io.META_FILE, weights_only=True)
    assert meta["kinds"] == kinds and ["model", "0.weight"] in meta["tensor_paths"]
    loaded = sharded_io.load_sharded(path, distributed=False)
    assert loaded["step"] == 7 and loaded["notes"][0] == "a" and torch.equal(loaded["notes"][1], torch.tensor(2.0))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)
    assert loaded["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]  # the indexed form again

    # a save that fails leaves the previous checkpoint and no staging directory; a good one replaces it
    with pytest.raises(Exception, match="lambda"):
        sharded_io.save_sharded(path, {"step": 8, "bad": lambda: 0}, {"step": "data", "bad": "data"}, Alone())
    assert sharded_io.load_sharded(path, distributed=False)["step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    sharded_io.save_sharded(path, {"step": 9}, {"step": "data"}, Alone())
    assert sharded_io.load_sharded(path, distributed=False) == {"step": 9}
    file_path = tmp_path / "was_a_file"
    file_path.write_text("old")
    sharded_io.save_sharded(file_path, {"step": 1}, {"step": "data"}, Alone())
    assert sharded_io.is_sharded_checkpoint(file_path) and sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt",
        "was_a_file",
    ]


def test_foreign_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a torchloom sharded checkpoint"):
        sharded_io.read_meta(tmp_path)
    (tmp_path / ".metadata").write_bytes(b"")
    torch.save({"format": "something else"}, tmp_path / sharded_io.META_FILE)
    with pytest.raises(ConfigurationError, match="not in the format this torchloom reads"):
        sharded_io.read_meta(tmp_path)
