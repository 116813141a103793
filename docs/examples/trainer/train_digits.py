"""Train a small CNN on scikit-learn's 8x8 digits with the Trainer: DDP on 2 CPU processes by default.

    python docs/examples/trainer/train_digits.py                             # DDP, 2 CPU processes
    python docs/examples/trainer/train_digits.py --strategy auto --devices 1 --precision bf16-mixed
    python docs/examples/trainer/train_digits.py --strategy ddp_spawn

The model is a ``LoomModule`` (what to compute per batch, which optimizer) and the data a
``LoomDataModule`` (prepare, split, dataloaders); the Trainer writes the loop. It validates every
epoch, keeps the checkpoint with the best validation accuracy (and the last one), stops early once
the validation loss stops improving, logs to TensorBoard, and finally tests the best checkpoint on
the held-out images. Rank 0 prints the test accuracy, the checkpoint, the log folder and the
``tensorboard --logdir`` command. The data is bundled with scikit-learn (no download).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, random_split

from torchloom.core.loggers import TensorBoardLogger
from torchloom.core.utils.seed import seed_everything
from torchloom.trainer import LoomDataModule, LoomModule, Trainer
from torchloom.trainer.callbacks import EarlyStopping, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # docs/examples: the shared digits.py
from digits import DigitsCNN, add_hardware_arguments, load_digits_tensors, split_digits, tensorboard_program

Sample = tuple[torch.Tensor, ...]  # (image, label)
Batch = list[torch.Tensor]  # [images, labels], as the default collate makes them


class DigitsData(LoomDataModule):
    """The 1797 digits: 80% for fitting (of which ``val_fraction`` validates), 20% held out for the test."""

    def __init__(self, data_dir: str, batch_size: int = 32, val_fraction: float = 0.15, seed: int = 7) -> None:
        super().__init__()
        self.save_hyperparameters()  # logged to TensorBoard next to the model's
        self.cache = Path(data_dir, "digits.pt")

    def prepare_data(self) -> None:
        # Runs once per machine (local rank 0) while the other processes wait: the place to download or
        # convert data. Here it turns scikit-learn's bundled file into a tensor file every process loads.
        if not self.cache.is_file():
            images, labels = load_digits_tensors()
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            partial = self.cache.with_suffix(".partial")
            torch.save({"images": images, "labels": labels}, partial)
            partial.replace(self.cache)  # never a half-written file for the others to read

    def setup(self, stage: str) -> None:
        # Runs in every process; the splits depend on the seed only, so they agree everywhere.
        data = torch.load(self.cache, weights_only=True)
        fit_set, self.test_set = split_digits(data["images"], data["labels"], seed=self.hparams.seed)
        val_size = round(self.hparams.val_fraction * len(fit_set))
        generator = torch.Generator().manual_seed(self.hparams.seed)
        self.train_set, self.val_set = random_split(fit_set, [len(fit_set) - val_size, val_size], generator)

    # The Trainer gives every process its share (a DistributedSampler) and moves the batches to the device.
    def train_dataloader(self) -> DataLoader[Sample]:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[Sample]:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader[Sample]:
        return DataLoader(self.test_set, batch_size=256)


class DigitsClassifier(LoomModule):
    """The CNN from digits.py, trained with Adam and cross-entropy; logs loss and accuracy."""

    def __init__(self, lr: float = 3e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()  # saved in every checkpoint: load_from_checkpoint(path) rebuilds the model
        self.network = DigitsCNN()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.network(images)
        return logits

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, on_epoch=True, sync_dist=True)
        return loss  # the Trainer runs backward, the DDP gradient sync and the optimizer step

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: Batch, stage: str) -> None:
        images, labels = batch
        logits = self(images)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        # sync_dist: the epoch value is the mean over every process's images, not over this rank's only
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels), prog_bar=True, sync_dist=True)
        self.log(f"{stage}_acc", accuracy, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    seed_everything(args.seed)  # same initial weights in every process, seeded samplers
    data = DigitsData(os.path.join(args.out, "data"), batch_size=args.batch_size, seed=args.seed)
    model = DigitsClassifier(lr=args.lr)
    trainer = Trainer(
        accelerator=args.accelerator,
        strategy=args.strategy,
        devices=args.devices,
        precision=args.precision,
        max_epochs=args.max_epochs,
        callbacks=[
            ModelCheckpoint(monitor="val_acc", mode="max", save_last=True, filename="{epoch}-{val_acc:.4f}"),
            EarlyStopping(monitor="val_loss", patience=args.patience),
        ],
        logger=TensorBoardLogger(args.out, name="tensorboard"),
        enable_progress_bar=not args.no_progress_bar,
    )
    # With strategy "ddp" this script is run again as the other processes; each one goes through the
    # lines below, and the Trainer runs them in step. With "ddp_spawn" only this process gets here.
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds, stopped_early = time.perf_counter() - started, trainer.should_stop
    results = trainer.test(ckpt_path="best", datamodule=data, verbose=False)  # the best weights, not the last
    if trainer.is_global_zero:
        report(trainer, args, results[0]["test_acc"], fit_seconds, stopped_early)


def report(trainer: Trainer, args: argparse.Namespace, accuracy: float, seconds: float, stopped_early: bool) -> None:
    """What rank 0 prints at the end."""
    checkpoint, logger = trainer.checkpoint_callback, trainer.logger
    assert isinstance(checkpoint, ModelCheckpoint) and isinstance(logger, TensorBoardLogger)
    processes = f"{trainer.world_size} process" + ("es" if trainer.world_size > 1 else "")
    why = f"early stopping: val_loss did not improve for {args.patience} epochs" if stopped_early else "max_epochs"
    print(
        f"fit: {trainer.current_epoch} of at most {args.max_epochs} epochs ({why}) in {seconds:.1f} s; "
        f"{processes}, {type(trainer.strategy).__name__}, {trainer.precision.name}\n"
        f"test accuracy: {accuracy:.4f} (the held-out 20% of the digits, with the best checkpoint's weights)\n"
        f"best checkpoint: {Path(checkpoint.best_model_path).resolve()}\n"
        f"last checkpoint: {Path(checkpoint.last_model_path).resolve()}\n"
        f"logs: {Path(trainer.log_dir).resolve()}\n"
        f"view the logs: {tensorboard_program()} --logdir {Path(logger.root_dir, logger.name).resolve()}"
        " (then open http://localhost:6006)",
        flush=True,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a small CNN on the 8x8 digits with the Trainer.")
    add_hardware_arguments(parser)
    parser.add_argument("--max-epochs", type=int, default=20, help="early stopping may end the fit sooner")
    parser.add_argument("--patience", type=int, default=3, help="epochs without a lower val_loss before stopping")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=os.path.join("runs", "trainer-digits"), help="data, logs, checkpoints")
    parser.add_argument("--no-progress-bar", action="store_true", help="plain output, e.g. for log files")
    return parser.parse_args(argv)


if __name__ == "__main__":  # needed: ddp_spawn imports this file in every worker
    main()
