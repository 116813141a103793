"""The built-in callbacks inside real ``Trainer.fit`` runs (single process; 2 ranks at the end)."""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from torchloom.core.errors import ConfigurationError
from torchloom.core.loggers import CSVLogger
from torchloom.trainer.callbacks import (
    EarlyStopping,
    LambdaCallback,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelSummary,
    Timer,
    TQDMProgressBar,
)
from torchloom.trainer.module import LoomModule
from torchloom.trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


class Regressor(LoomModule):
    """Linear regression; ``val_losses`` (if given) replaces the logged validation loss epoch by epoch."""

    def __init__(self, val_losses: list[float] | None = None, train_metric_on_epoch: bool = False) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.val_losses = val_losses
        self.train_metric_on_epoch = train_metric_on_epoch

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss, prog_bar=True, on_epoch=self.train_metric_on_epoch)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        if self.val_losses is not None:
            loss = torch.tensor(self.val_losses[min(self.current_epoch, len(self.val_losses) - 1)])
        self.log("val_loss", loss, prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


def loader(n: int = 32, seed: int = 0) -> DataLoader[tuple[Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> Trainer:
    options: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
        "devices": 1,
    }
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.ckpt")}


def test_top_k_last_and_callback_state_in_the_files(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2, save_last=True, filename="{epoch}"
    )
    t = trainer(tmp_path, [ckpt], max_epochs=4)
    t.fit(Regressor(val_losses=[4.0, 2.0, 3.0, 1.0]), loader(), loader(seed=1))
    assert names(tmp_path / "ckpt") == {"epoch=1.ckpt", "epoch=3.ckpt", "last.ckpt"}
    assert t.checkpoint_callback is ckpt and ckpt.best_model_path == str(tmp_path / "ckpt" / "epoch=3.ckpt")
    saved = torch.load(ckpt.best_model_path, weights_only=True)
    assert saved["epoch"] == 3 and saved["callbacks"][ckpt.state_key]["best_model_path"] == ckpt.best_model_path
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == t.global_step == 16
    restored = Regressor.load_from_checkpoint(ckpt.best_model_path)
    assert torch.equal(restored.layer.weight, saved["state_dict"]["layer.weight"])


def test_default_checkpoint_lands_under_the_log_dir(tmp_path: Path) -> None:
    t = Trainer(
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="run", version=3),
        max_epochs=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    t.fit(Regressor(), loader())
    assert t.checkpoint_callback is not None
    assert names(tmp_path / "run" / "version_3" / "checkpoints") == {"epoch=1-step=8.ckpt"}


def test_resume_continues_ranking_and_early_stopping_state(tmp_path: Path) -> None:
    losses = [5.0, 3.0, 4.0, 4.5, 4.2, 6.0]

    def callbacks() -> list[Any]:
        ckpt = ModelCheckpoint(
            dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2, save_last=True, filename="{epoch}"
        )
        return [ckpt, EarlyStopping("val_loss", patience=3)]

    first = trainer(tmp_path, callbacks(), max_epochs=3)
    first.fit(Regressor(val_losses=losses), loader(), loader(seed=1))
    assert names(tmp_path / "ckpt") == {"epoch=1.ckpt", "epoch=2.ckpt", "last.ckpt"}

    resumed_callbacks = callbacks()
    second = trainer(tmp_path, resumed_callbacks, max_epochs=10)
    second.fit(Regressor(val_losses=losses), loader(), loader(seed=1), ckpt_path="last")
    ckpt, stopper = resumed_callbacks
    assert isinstance(ckpt, ModelCheckpoint) and isinstance(stopper, EarlyStopping)
    # epoch 2 (4.0) already waited one check; 4.5 and 4.2 make three: stop at epoch 4
    assert stopper.stopped_epoch == 4 and second.current_epoch == 5 and second.should_stop
    assert names(tmp_path / "ckpt") == {"epoch=1.ckpt", "epoch=2.ckpt", "last.ckpt"}  # 4.5, 4.2 are no better
    assert ckpt.best_model_path.endswith("epoch=1.ckpt")


def test_monitor_never_logged_fails_the_fit(tmp_path: Path) -> None:
    t = trainer(tmp_path, [ModelCheckpoint(monitor="val_acc")], max_epochs=1)
    with pytest.raises(ConfigurationError, match=r"monitor='val_acc'.*'val_loss'"):
        t.fit(Regressor(), loader(), loader(seed=1))
    t = trainer(tmp_path, [EarlyStopping("val_acc")], max_epochs=1)
    with pytest.raises(ConfigurationError, match=r"monitor='val_acc'.*'val_loss'"):
        t.fit(Regressor(), loader(), loader(seed=1))


def test_epoch_training_metric_is_monitored_without_validation(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(
        dirpath=tmp_path, monitor="train_loss_epoch", mode="min", filename="{epoch}-{train_loss_epoch:.3f}"
    )
    t = trainer(tmp_path, [ckpt, EarlyStopping("train_loss_epoch", patience=100)], max_epochs=2)
    t.fit(Regressor(train_metric_on_epoch=True), loader())
    assert len(names(tmp_path)) == 1 and ckpt.best_model_score is not None


def test_step_checkpoints_see_the_metric_of_their_own_step(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="train_loss", every_n_train_steps=1, save_top_k=-1)
    seen: list[float] = []
    probe = LambdaCallback(
        on_train_batch_end=lambda tr, m, out, b, i: seen.append(float(out["loss"] if isinstance(out, dict) else out))
    )
    t = trainer(tmp_path, [probe, ckpt], max_epochs=1)
    t.fit(Regressor(), loader())
    scores = sorted(float(s) for s in ckpt.best_k_models.values())
    assert scores == pytest.approx(sorted(seen))


def test_early_stopping_stops_the_fit(tmp_path: Path) -> None:
    stopper = EarlyStopping("val_loss", patience=2)
    t = trainer(tmp_path, [stopper], max_epochs=20)
    t.fit(Regressor(val_losses=[1.0, 1.0, 1.0, 0.5]), loader(), loader(seed=1))
    assert t.should_stop and stopper.stopped_epoch == 2 and t.current_epoch == 3


def test_lr_monitor_writes_the_scheduled_rates(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="lr", version=0)
    t = trainer(
        tmp_path, [LearningRateMonitor(log_momentum=True)], logger=logger, max_epochs=3, enable_checkpointing=False
    )
    t.fit(Regressor(), loader())
    logger.finalize()
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-SGD")]
    assert [float(r["lr-SGD"]) for r in rows] == pytest.approx([0.05, 0.025, 0.0125])
    assert {float(r["lr-SGD-momentum"]) for r in rows} == {0.9}


def test_progress_bar_summary_timer_and_lambda_hooks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    calls: list[str] = []
    timer = Timer(duration=datetime.timedelta(microseconds=1), verbose=False)
    hooks = LambdaCallback(
        on_fit_start=lambda tr, m: calls.append("fit_start"), on_train_end=lambda tr, m: calls.append("train_end")
    )
    t = trainer(
        tmp_path,
        [TQDMProgressBar(file=out, min_refresh_interval=0), ModelSummary(max_depth=-1), timer, hooks],
        max_epochs=5,
        enable_progress_bar=True,
        enable_model_summary=True,
    )
    t.fit(Regressor(), loader(), loader(seed=1))
    assert t.global_step == 1 and t.should_stop  # the tiny budget is spent by the first step
    assert calls == ["fit_start", "train_end"]
    printed = capsys.readouterr().out
    assert printed.count("Total params") == 1 and "0 | layer | Linear | 5" in printed  # ours, not a default one
    text = out.getvalue()
    assert "Epoch 0" in text and "1/4" in text and "train_loss=" in text and "loss=" in text
    assert timer.time_elapsed("train") > 0


@pytest.mark.slow
def test_two_ranks_agree_on_checkpoints_and_stopping(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    process = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=180, env=env, check=False
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    folder = tmp_path / "ckpt"
    for result in ranks:  # rank 1 asked to stop after epoch 1; both stopped there, with rank 0's ranking
        assert result["stopped_epoch"] == 1 and result["epoch"] == 2 and result["should_stop"]
        assert result["best_k_models"] == {str(folder / "epoch=0.ckpt"): 5.0, str(folder / "epoch=1.ckpt"): 4.0}
    assert names(folder) == {"epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"}


class RankDependent(Regressor):
    """Rank 0's validation loss improves, rank 1's never does (no sync_dist): the ranks disagree."""

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        improving = [5.0, 4.0, 3.0, 2.0, 1.0]
        worsening = [5.0, 6.0, 7.0, 8.0, 9.0]
        self.log("val_loss", (improving if self.global_rank == 0 else worsening)[self.current_epoch])


def _two_rank_fit(out_dir: str) -> None:
    ckpt = ModelCheckpoint(
        dirpath=Path(out_dir, "ckpt"), monitor="val_loss", save_top_k=2, save_last=True, filename="{epoch}"
    )
    stopper = EarlyStopping("val_loss", patience=1)

    def report(t: Trainer, module: LoomModule) -> None:
        result = {
            "stopped_epoch": stopper.stopped_epoch,
            "epoch": t.current_epoch,
            "should_stop": t.should_stop,
            "best_k_models": {k: float(v) for k, v in ckpt.best_k_models.items()},
        }
        Path(out_dir, f"rank{t.global_rank}.json").write_text(json.dumps(result))

    t = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_epochs=5,
        logger=False,
        default_root_dir=out_dir,
        callbacks=[ckpt, stopper, LambdaCallback(on_train_end=report)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    t.fit(RankDependent(), loader(), loader(seed=1))


if __name__ == "__main__":
    _two_rank_fit(sys.argv[1])
