"""Small shared helpers: nested collections, optional imports, seeding, init skipping, rank-zero."""

from __future__ import annotations

import dataclasses
import random
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

from torchloom.core.errors import ConfigurationError, MissingDependencyError
from torchloom.core.utils import rank_zero
from torchloom.core.utils.collections import apply_to_collection
from torchloom.core.utils.imports import is_available, require
from torchloom.core.utils.init import SkipInit
from torchloom.core.utils.seed import SEED_ENV, SEED_WORKERS_ENV, seed_everything


class Pair(NamedTuple):
    a: torch.Tensor
    b: str


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    label: int


def test_apply_to_collection_rebuilds_every_container_type() -> None:
    data = {
        "list": [torch.ones(1), 2],
        "tuple": (torch.ones(1),),
        "named": Pair(torch.ones(1), "keep"),
        "ordered": OrderedDict(t=torch.ones(1)),
        "dc": Batch(torch.ones(1), 5),
        "text": "unchanged",
    }
    out = apply_to_collection(data, torch.Tensor, lambda t: t * 2)
    assert out["list"][0].item() == 2 and out["list"][1] == 2
    assert isinstance(out["tuple"], tuple) and out["tuple"][0].item() == 2
    assert isinstance(out["named"], Pair) and out["named"].a.item() == 2 and out["named"].b == "keep"
    assert isinstance(out["ordered"], OrderedDict) and out["ordered"]["t"].item() == 2
    assert isinstance(out["dc"], Batch) and out["dc"].x.item() == 2 and out["dc"].label == 5
    assert out["text"] == "unchanged"


def test_require_names_the_install_line() -> None:
    assert is_available("torch")
    assert not is_available("surely_not_a_module_xyz")
    if is_available("deepspeed"):
        pytest.skip("deepspeed is installed here")
    with pytest.raises(MissingDependencyError, match=r"pip install 'torchloom-core\[deepspeed\]'") as info:
        require("deepspeed", "The DeepSpeed strategy")
    assert "The DeepSpeed strategy" in str(info.value)


def test_seed_everything_makes_every_generator_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (SEED_ENV, SEED_WORKERS_ENV):  # it exports them: keep them out of later tests' jobs
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    def draw() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    seed_everything(123)
    first = draw()
    seed_everything(123)
    assert draw() == first
    with pytest.raises(ConfigurationError, match="-1"):
        seed_everything(-1)


def test_skip_init_allocates_without_initialising() -> None:
    # Initialisation draws from the RNG; a skipped one leaves the generator untouched. (Comparing
    # values would not work: an uninitialised tensor may reuse a freed block holding old values.)
    state = torch.get_rng_state()
    with SkipInit():
        skipped = nn.Sequential(nn.Linear(64, 64), nn.Conv2d(3, 8, 3), nn.Embedding(10, 4))
    assert torch.equal(torch.get_rng_state(), state)
    assert skipped[0].weight.shape == (64, 64)
    with SkipInit(enabled=False):
        nn.Linear(64, 64)
    assert not torch.equal(torch.get_rng_state(), state)


def test_rank_zero_only_runs_on_rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    fn = rank_zero.rank_zero_only(lambda: calls.append(1))
    monkeypatch.setattr(rank_zero, "_rank", 1)
    fn()
    assert calls == []
    monkeypatch.setattr(rank_zero, "_rank", 0)
    fn()
    assert calls == [1]
