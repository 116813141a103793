"""Fabric changes nothing about the numbers: a loop with Fabric and the same loop in plain PyTorch end
with bit-identical weights (``torch.equal``), on one device and on 2 DDP ranks, in ``32-true``,
``bf16-mixed`` and ``16-mixed``. The loops are in ``parity_helpers.py``.

Guards against a vacuous pass: the weights moved, mixed precision gives other weights than
``32-true`` (autocast really ran), and under ``16-mixed`` the grad scaler skipped steps (its scale
went down) in both loops alike.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from tests.fabric.helpers import env
from tests.fabric.parity_helpers import PRECISIONS, run_fabric, run_plain
from torchloom.fabric import Fabric

INITIAL_SCALE = 2.0**16  # GradScaler's default


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env.clear(monkeypatch)  # seed_everything exports the seed; keep it out of other tests


def differing(ours: dict[str, Tensor], theirs: dict[str, Tensor]) -> list[str]:
    """Names of the tensors that are not bit-identical, with their largest difference."""
    assert ours.keys() == theirs.keys()
    return [
        f"{name} (max |diff| {(ours[name].double() - theirs[name].double()).abs().max().item():.3g})"
        for name in ours
        if not torch.equal(ours[name], theirs[name])
    ]


def check_parity(ours: dict[str, Any], plain: dict[str, Any], plain_32: dict[str, Any], precision: str) -> None:
    assert not differing(ours["initial"], plain["initial"])
    assert not differing(ours["final"], plain["final"]), differing(ours["final"], plain["final"])
    assert ours["scale"] == plain["scale"]
    assert len(differing(ours["final"], ours["initial"])) == len(ours["initial"]), "every tensor must have trained"
    if precision != "32-true":
        assert differing(ours["final"], plain_32["final"]), "autocast had no effect"
    if precision == "16-mixed":
        assert ours["scale"] < INITIAL_SCALE, "no step overflowed: the scaler's skip path was not exercised"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_single_device_fabric_loop_equals_plain_pytorch(precision: str) -> None:
    fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    ours = run_fabric(fabric)
    plain = run_plain(precision)
    check_parity(ours, plain, run_plain("32-true"), precision)


@pytest.mark.slow
def test_two_rank_ddp_fabric_loop_equals_plain_ddp(
    ddp_script_job: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """One launch: both workers run all three precisions, the Fabric loop and then the plain DDP loop.

    The launch is helpers/ddp_script.py's (conftest.py): its workers run these loops after their own checks.
    """
    process, tmp_path = ddp_script_job
    assert process.returncode == 0, f"--- stdout\n{process.stdout[-3000:]}\n--- stderr\n{process.stderr[-6000:]}"
    errors = {path.name: path.read_text() for path in sorted(tmp_path.glob("parity-error-rank*.txt"))}
    assert not errors, "\n".join(f"--- {name}\n{text}" for name, text in errors.items())

    def result(precision: str, loop: str, rank: int) -> dict[str, Any]:
        loaded: dict[str, Any] = torch.load(tmp_path / f"{precision}-{loop}-rank{rank}.pt", weights_only=True)
        return loaded

    for precision in PRECISIONS:
        for rank in (0, 1):
            ours, plain = result(precision, "fabric", rank), result(precision, "plain", rank)
            check_parity(ours, plain, result("32-true", "plain", rank), precision)
        # the replicas agree, and each rank saw its own half of the data (else DDP would hide nothing)
        assert not differing(result(precision, "fabric", 0)["final"], result(precision, "fabric", 1)["final"])
    single = run_plain("32-true")["final"]
    assert differing(result("32-true", "plain", 0)["final"], single), "2 ranks trained like 1: no data was split"
