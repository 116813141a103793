"""One 2-rank DDP job on the CPU, run by test_trainer_distributed.py as ``python engine_ddp_run.py MODE FOLDER``.

MODE is ``spawn``, ``fork`` or ``popen`` (what ``ddp_spawn``, ``ddp_fork`` and ``ddp`` use): fit, test and
predict (not predict under spawn, where every launch costs the import of torch twice). Each rank checks
on its own that the Trainer's weights equal a plain DDP loop's (a failed check fails the worker, which
fails the job) and writes ``rank{r}.json``; the process that called ``fit`` (the parent under spawn and
fork, every worker under popen) writes ``caller{r}.json`` with what came back to its objects.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.trainer.engine_models import Regressor, dataset
from torchloom.core.loggers.csv import CSVLogger
from torchloom.core.strategies.ddp import DDPStrategy
from torchloom.trainer import LoomDataModule, Trainer
from torchloom.trainer.callbacks import Callback, EarlyStopping, ModelCheckpoint

EPOCHS, ACCUMULATE, CLIP, BATCH = 3, 2, 0.05, 4


class Data(LoomDataModule):
    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def prepare_data(self) -> None:
        with open(os.path.join(self.folder, "prepare_data.txt"), "a") as file:
            file.write(f"pid {os.getpid()}\n")

    def train_dataloader(self) -> Any:
        return DataLoader(dataset(36), batch_size=BATCH, shuffle=True)

    def val_dataloader(self) -> Any:
        return DataLoader(dataset(16, seed=1), batch_size=BATCH)

    def test_dataloader(self) -> Any:
        return DataLoader(dataset(16, seed=2), batch_size=BATCH)

    def predict_dataloader(self) -> Any:
        return DataLoader(dataset(16, seed=3), batch_size=BATCH)


class Model(Regressor):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        rank = float(self.global_rank)
        self.log("rank_mean", rank, sync_dist=True)  # reduced across ranks: 0.5
        self.log("rank_own", rank)  # each rank's own
        # rank 1 keeps improving, rank 0 never does: early stopping must still stop both together
        self.log("diverging", -float(self.current_epoch) if rank else 0.0)


class PlainLoopCheck(Callback):
    """Each rank trains a copy of the initial model with plain torch DDP and compares the weights."""

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        self.initial = copy.deepcopy(module.state_dict())

    def on_fit_end(self, trainer: Any, module: Any) -> None:
        reference = Model()
        reference.load_state_dict(self.initial)
        ddp = DistributedDataParallel(reference)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=reference.lr, momentum=0.9)
        sampler: DistributedSampler[Any] = DistributedSampler(
            dataset(36), num_replicas=2, rank=trainer.global_rank, shuffle=True, seed=0
        )
        data = DataLoader(dataset(36), batch_size=BATCH, sampler=sampler)
        for epoch in range(trainer.current_epoch):
            sampler.set_epoch(epoch)
            for index, batch in enumerate(data):
                steps = (index + 1) % ACCUMULATE == 0 or index + 1 == len(data)
                context = ddp.no_sync() if not steps else torch.enable_grad()
                with context:
                    x, y = batch
                    loss = torch.nn.functional.mse_loss(ddp(x), y) / ACCUMULATE
                    loss.backward()  # type: ignore[no-untyped-call]
                if steps:
                    torch.nn.utils.clip_grad_norm_([p for p in ddp.parameters() if p.grad is not None], CLIP)
                    optimizer.step()
                    optimizer.zero_grad()
        mine, theirs = module.state_dict(), reference.state_dict()
        different = [k for k in mine if not torch.equal(mine[k], theirs[k])]
        assert not different, f"rank {trainer.global_rank}: Trainer and plain DDP differ in {different}"
        report = {"global_step": trainer.global_step, "epoch": trainer.current_epoch, "parity": True}
        report["rank_own"] = float(trainer.callback_metrics["rank_own"])
        report["rank_mean"] = float(trainer.callback_metrics["rank_mean"])
        Path(trainer.default_root_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
        if trainer.global_rank == 0:
            torch.save(module.state_dict(), os.path.join(trainer.default_root_dir, "rank0_weights.pt"))


def main(mode: str, folder: str) -> None:
    start_method = {"spawn": "spawn", "fork": "fork", "popen": "popen"}[mode]
    strategy = DDPStrategy(start_method=start_method, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = Model()
    data = Data(folder)
    checkpoints = ModelCheckpoint(dirpath=os.path.join(folder, "checkpoints"), monitor="val_loss", save_last=True)
    trainer = Trainer(
        accelerator="cpu",
        strategy=strategy,
        devices=2,
        max_epochs=EPOCHS,
        accumulate_grad_batches=ACCUMULATE,
        gradient_clip_val=CLIP,
        num_sanity_val_steps=1,
        default_root_dir=folder,
        logger=CSVLogger(folder, version=0),
        callbacks=[PlainLoopCheck(), EarlyStopping(monitor="diverging", patience=0), checkpoints],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    (tested,) = trainer.test(model, datamodule=data, verbose=False)
    predictions = trainer.predict(model, datamodule=data) if mode != "spawn" else []  # spawn: ~10 s per launch
    report = {
        "pid": os.getpid(),
        "global_rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "best_model_path": trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None,
        "test": tested,
        "prediction_rows": sum(len(p) for p in predictions),
        "weights": {k: v.tolist() for k, v in model.state_dict().items()},
    }
    Path(folder, f"caller{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
