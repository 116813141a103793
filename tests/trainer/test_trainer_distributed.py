"""Real 2-rank DDP fits on the CPU (gloo) under each launcher; every job runs as a subprocess with a timeout.

One job per launcher checks many things at once (see engine_ddp_run.py): identical weights to a plain
DDP loop with gradient accumulation and clipping, results and weights back in the caller's objects,
``sync_dist`` reductions, ``prepare_data`` once per node, checkpoints written once, and early stopping
that ends every rank at the same step although the ranks disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.processes import explain, run_python

SCRIPT = Path(__file__).with_name("engine_ddp_run.py")

pytestmark = pytest.mark.slow


def run_job(mode: str, folder: Path) -> None:
    """Runs the job in its own process group, so a timeout can kill the workers too, not just the caller."""
    process = run_python(SCRIPT, mode, str(folder), timeout=150)
    assert process.returncode == 0, explain(process)


def read(folder: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / name).read_text())
    return data


def check_ranks_agree(folder: Path) -> dict[str, Any]:
    ranks = [read(folder, f"rank{r}.json") for r in (0, 1)]
    assert all(r["parity"] for r in ranks)  # asserted in each worker too: a mismatch fails the job
    assert ranks[0]["global_step"] == ranks[1]["global_step"] and ranks[0]["epoch"] == ranks[1]["epoch"]
    assert ranks[0]["epoch"] < 3  # early stopping fired, on both ranks together
    assert [r["rank_own"] for r in ranks] == [0.0, 1.0] and [r["rank_mean"] for r in ranks] == [0.5, 0.5]
    return ranks[0]


def check_checkpoints(folder: Path, caller: dict[str, Any]) -> None:
    files = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert len(files) == 2 and "last.ckpt" in files, files  # best (top 1) and last, each written by rank 0 once
    for name in files:
        torch.load(folder / "checkpoints" / name, weights_only=True)
    assert Path(caller["best_model_path"]).parent == folder / "checkpoints"


@pytest.mark.parametrize("mode", ["spawn", "fork"])
def test_spawned_and_forked_workers_send_their_results_back(mode: str, tmp_path: Path) -> None:
    run_job(mode, tmp_path)
    rank0 = check_ranks_agree(tmp_path)
    caller = read(tmp_path, "caller0.json")
    assert (caller["global_step"], caller["epoch"]) == (rank0["global_step"], rank0["epoch"])
    trained = torch.load(tmp_path / "rank0_weights.pt", weights_only=True)
    for key, value in caller["weights"].items():
        assert torch.equal(torch.tensor(value), trained[key]), key  # the caller's module holds the trained weights
    metrics = caller["callback_metrics"]
    assert metrics["rank_mean"] == 0.5 and metrics["rank_own"] == 0.0 and "val_loss" in metrics
    assert "test_loss" in caller["test"]
    assert caller["prediction_rows"] == (8 if mode == "fork" else 0)  # rank 0's half of 16 samples
    check_checkpoints(tmp_path, caller)
    launches = 3 if mode == "fork" else 2
    assert len((tmp_path / "prepare_data.txt").read_text().splitlines()) == launches  # once per run, not per rank


def test_script_launched_workers_run_fit_test_and_predict_themselves(tmp_path: Path) -> None:
    run_job("popen", tmp_path)
    check_ranks_agree(tmp_path)
    callers = [read(tmp_path, f"caller{r}.json") for r in (0, 1)]
    assert callers[0]["pid"] != callers[1]["pid"] and [c["global_rank"] for c in callers] == [0, 1]
    assert callers[0]["weights"] == callers[1]["weights"]
    assert all("test_loss" in c["test"] for c in callers)  # each rank's own shard: not synced, so they differ
    assert [c["prediction_rows"] for c in callers] == [8, 8]
    check_checkpoints(tmp_path, callers[0])
    assert len((tmp_path / "prepare_data.txt").read_text().splitlines()) == 3
