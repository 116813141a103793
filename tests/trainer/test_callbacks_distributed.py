"""Callbacks on 2 real gloo ranks that see different metric values: one ranking, one writer, one stop.

The test runs this file as a script (a fresh interpreter, with a timeout) that forks two workers with
the core multiprocessing launcher; each worker drives the callbacks through the fake trainer with a
real ``DDPStrategy`` and writes what it ended with to a JSON file.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def worker(strategy: Any, out_dir: str) -> None:
    import torch

    from tests.trainer.test_callbacks_fakes import FakeTrainer
    from torchloom.core.checkpoint.io import TorchCheckpointIO
    from torchloom.trainer.callbacks import EarlyStopping, ModelCheckpoint, Timer

    class CountingIO(TorchCheckpointIO):
        writes = 0

        def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> None:
            CountingIO.writes += 1
            super().save_checkpoint(checkpoint, path)

    strategy.checkpoint_io = CountingIO()
    rank = strategy.global_rank
    ckpt = ModelCheckpoint(monitor="val_loss", save_top_k=2, filename="{epoch}-{val_loss:.1f}", save_last=True)
    stopper = EarlyStopping("val_loss", patience=1)
    timer = Timer(duration={"days": 1})
    # rank 0 keeps improving; rank 1 never does and asks to stop after epoch 1
    scores = [5.0, 4.0, 3.0, 2.0] if rank == 0 else [5.0, 6.0, 7.0, 8.0]
    trainer = FakeTrainer(out_dir, [ckpt, stopper, timer], strategy=strategy)
    trainer.log_dir = os.path.join(out_dir, f"logs_of_rank_{rank}")  # ranks disagree: rank 0's folder wins
    trainer.fit(scores)
    result = {
        "rank": rank,
        "epoch": trainer.current_epoch,
        "should_stop": trainer.should_stop,
        "dirpath": ckpt.dirpath,
        "best_k_models": {k: float(v) for k, v in ckpt.best_k_models.items()},
        "best_model_path": ckpt.best_model_path,
        "writes": CountingIO.writes,
        "save_calls": len(trainer.saved),
        "stopped_epoch": stopper.stopped_epoch,
    }
    torch.distributed.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def main(out_dir: str) -> None:
    import torch

    from torchloom.core.accelerators.cpu import CPUAccelerator
    from torchloom.core.environments.local import LocalEnvironment
    from torchloom.core.strategies.ddp import DDPStrategy

    strategy = DDPStrategy(
        accelerator=CPUAccelerator(),
        parallel_devices=[torch.device("cpu")] * 2,
        cluster_environment=LocalEnvironment(),
        start_method="fork",
        timeout=datetime.timedelta(seconds=60),
    )
    strategy.configure_launcher()
    assert strategy.launcher is not None
    strategy.launcher.launch(worker, strategy, out_dir)


def test_two_ranks_with_different_metrics_agree(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    process = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    checkpoints = tmp_path / "logs_of_rank_0" / "checkpoints"
    for result in ranks:
        assert result["epoch"] == 1 and result["should_stop"] and result["stopped_epoch"] == 1
        assert result["dirpath"] == str(checkpoints)
        assert result["best_k_models"] == {
            str(checkpoints / "epoch=0-val_loss=5.0.ckpt"): 5.0,
            str(checkpoints / "epoch=1-val_loss=4.0.ckpt"): 4.0,  # rank 0's score, on both ranks
        }
        assert result["save_calls"] == 4  # two top-k files and last.ckpt twice, called on every rank
    assert [r["writes"] for r in ranks] == [4, 0]  # written by rank 0 only
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "epoch=0-val_loss=5.0.ckpt",
        "epoch=1-val_loss=4.0.ckpt",
        "last.ckpt",
    ]
    assert not (tmp_path / "logs_of_rank_1").exists()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1])
