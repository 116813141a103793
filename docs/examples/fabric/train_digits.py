"""Train a small CNN on scikit-learn's 8x8 digits with Fabric: DDP on 2 CPU processes by default.

    python docs/examples/fabric/train_digits.py                              # DDP, 2 CPU processes
    python docs/examples/fabric/train_digits.py --strategy auto --devices 1 --precision bf16-mixed
    python docs/examples/fabric/train_digits.py --strategy ddp_spawn
    python docs/examples/fabric/train_digits.py --strategy fsdp              # sharded; the checkpoint is a folder
    torchloom run --devices 2 docs/examples/fabric/train_digits.py          # the CLI's options win

It is a plain PyTorch loop; the Fabric lines are marked ``# Fabric``. The data is bundled with
scikit-learn (no download). Rank 0 prints the held-out accuracy, where the checkpoint and the logs
went, and the command that shows the logs in TensorBoard.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from torchloom.core.loggers import CSVLogger, TensorBoardLogger
from torchloom.fabric import Fabric

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # docs/examples: the shared digits.py
from digits import DigitsCNN, add_hardware_arguments, load_digits_split, tensorboard_program


def train(fabric: Fabric, args: argparse.Namespace) -> float:
    """Runs in every process; returns the held-out accuracy."""
    fabric.seed_everything(args.seed)  # Fabric: same initial weights everywhere, seeded sampler
    train_set, test_set = load_digits_split(seed=args.seed)
    train_loader = fabric.setup_dataloaders(  # Fabric: each rank gets its share, batches go to the device
        DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    )
    # Each rank scores a disjoint slice of the held-out set: every image exactly once, whatever the world size.
    my_slice = Subset(test_set, range(fabric.global_rank, len(test_set), fabric.world_size))
    test_loader = fabric.setup_dataloaders(DataLoader(my_slice, batch_size=256), use_distributed_sampler=False)

    with fabric.init_module():  # Fabric: built on the device, in the precision's dtype
        model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model, optimizer = fabric.setup(model, optimizer)  # Fabric: DDP wrapper, precision, device
    settings = {**vars(args), "precision": fabric.precision.name, "world_size": fabric.world_size}  # as resolved
    for logger in fabric.loggers:
        logger.log_hyperparams(settings)

    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        loss_sum, batches = torch.zeros((), device=fabric.device), 0
        for images, labels in train_loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            fabric.backward(loss)  # Fabric: instead of loss.backward()
            # Under 16-mixed the grad scaler skips the steps whose gradients overflowed: do not raise on those.
            fabric.clip_gradients(model, optimizer, max_norm=5.0)
            optimizer.step()
            loss_sum += loss.detach()
            batches += 1
        train_loss = fabric.all_reduce(loss_sum / batches, reduce_op="mean")
        accuracy = evaluate(fabric, model, test_loader)
        fabric.log_dict({"train_loss": train_loss, "val_accuracy": accuracy}, step=epoch)
        fabric.print(
            f"epoch {epoch + 1:2d}/{args.epochs}  train loss {train_loss:.4f}  held-out accuracy {accuracy:.4f}"
        )
    seconds = time.perf_counter() - started

    checkpoint = Path(args.out, "digits.pt").resolve()
    # "precision" keeps the grad scaler's state (16-mixed) for a resumed run; it is empty otherwise.
    state = {"model": model, "optimizer": optimizer, "epoch": args.epochs, "precision": fabric.precision}
    fabric.save(checkpoint, state)  # Fabric: rank 0 writes, every rank waits for it
    for logger in fabric.loggers:
        logger.finalize("success")  # flush and close the event and CSV files
    if fabric.is_global_zero:
        tensorboard, csv = fabric.loggers
        processes = f"{fabric.world_size} process" + ("es" if fabric.world_size > 1 else "")
        print(
            f"held-out accuracy: {accuracy:.4f} ({len(test_set)} images; {processes}, "
            f"{type(fabric.strategy).__name__}, {fabric.precision.name}, {seconds:.1f} s of training)\n"
            f"checkpoint: {checkpoint}\n"
            f"logs: {Path(tensorboard.log_dir).resolve()} (TensorBoard), "
            f"{Path(csv.log_dir, CSVLogger.METRICS_FILE).resolve()} (CSV)\n"
            f"view the logs: {tensorboard_program()} --logdir {Path(tensorboard.root_dir, tensorboard.name).resolve()}"
            " (then open http://localhost:6006)",
            flush=True,
        )
    return accuracy


@torch.no_grad()
def evaluate(fabric: Fabric, model: torch.nn.Module, test_loader: Iterable[list[torch.Tensor]]) -> float:
    """Held-out accuracy over all ranks: correct and total counts are summed across processes."""
    model.eval()
    counts = torch.zeros(2, device=fabric.device)
    for images, labels in test_loader:
        counts[0] += (model(images).argmax(dim=1) == labels).sum()
        counts[1] += len(labels)
    correct, total = fabric.all_reduce(counts, reduce_op="sum").tolist()
    return float(correct / total)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a small CNN on the 8x8 digits with Fabric.")
    add_hardware_arguments(parser)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=os.path.join("runs", "digits"), help="checkpoint and logs go here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # The loggers touch the disk on rank 0 only, and only once something is logged.
    loggers = [TensorBoardLogger(args.out, name="tensorboard"), CSVLogger(args.out, name="csv")]
    fabric = Fabric(  # Fabric: under `torchloom run` the CLI's options win over these
        accelerator=args.accelerator,
        strategy=args.strategy,
        devices=args.devices,
        precision=args.precision,
        loggers=loggers,
    )
    # Starts the processes and runs train() in each. With strategy "ddp" this script is run again as the
    # workers and this process exits inside launch() once they are done.
    fabric.launch(train, args)


if __name__ == "__main__":  # needed: ddp_spawn imports this file in every worker
    main()
