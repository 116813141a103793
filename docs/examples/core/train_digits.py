"""Train a digits classifier with nothing but torchloom.core: the connector picks the objects, the
strategy spreads the job, the launcher starts the workers.

    python docs/examples/core/train_digits.py                      # DDP on 2 CPU processes
    python docs/examples/core/train_digits.py --devices 1          # one process
    python docs/examples/core/train_digits.py --strategy ddp_spawn --precision bf16-mixed

The data is scikit-learn's bundled 8x8 digits (no download). Rank 0 prints the held-out accuracy
and where the checkpoint went. Products (Fabric, Trainer) wrap exactly these calls.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torchloom.core import Connector, Strategy


def load_digits_split(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    features = torch.tensor(x, dtype=torch.float32) / 16.0
    labels = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(order))
    train, test = order[:cut], order[cut:]
    return TensorDataset(features[train], labels[train]), TensorDataset(features[test], labels[test])


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))


def train(strategy: Strategy, args: argparse.Namespace) -> float:
    torch.manual_seed(args.seed)
    train_set, test_set = load_digits_split(args.seed)
    sampler_kwargs = strategy.distributed_sampler_kwargs
    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed, **sampler_kwargs) if sampler_kwargs else None
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None)

    with strategy.module_init_context():
        model = build_model()
    model = strategy.precision.convert_module(model)
    strategy.module_to_device(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    wrapped, (optimizer,), _ = strategy.setup_module_and_optimizers(model, [optimizer])

    started = time.perf_counter()
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        wrapped.train()
        for features, labels in loader:
            features, labels = strategy.batch_to_device((features, labels))
            with strategy.precision.forward_context():
                logits = wrapped(strategy.precision.convert_input(features))
            loss = nn.functional.cross_entropy(strategy.precision.convert_output(logits), labels)
            optimizer.zero_grad()
            strategy.backward(loss, wrapped)
            strategy.clip_gradients_norm(wrapped, optimizer, max_norm=5.0)
            strategy.optimizer_step(optimizer)
        mean_loss = strategy.all_reduce(loss.detach(), reduce_op="mean")
        if strategy.is_global_zero and (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  loss {mean_loss.item():.4f}", flush=True)

    accuracy = evaluate(strategy, wrapped, test_set)
    checkpoint = Path(args.out) / "digits.pt"
    strategy.save_checkpoint(checkpoint, {"model": wrapped, "optimizer": optimizer, "epochs": args.epochs})
    if strategy.is_global_zero:
        print(f"world size {strategy.world_size}, {time.perf_counter() - started:.1f} s of training")
        print(f"held-out accuracy: {accuracy:.4f}")
        print(f"checkpoint: {checkpoint.resolve()}")
    strategy.barrier("done")
    return accuracy


@torch.no_grad()
def evaluate(strategy: Strategy, model: nn.Module, test_set: TensorDataset) -> float:
    """Each rank scores a disjoint slice of the held-out set; the counts are summed across ranks."""
    model.eval()
    features, labels = strategy.batch_to_device(test_set.tensors)
    mine = slice(strategy.global_rank, None, strategy.world_size)
    with strategy.precision.forward_context():
        logits = model(strategy.precision.convert_input(features[mine]))
    counts = torch.tensor([(logits.argmax(-1) == labels[mine]).sum().item(), len(labels[mine])], dtype=torch.float64)
    correct, total = strategy.all_reduce(counts, reduce_op="sum").tolist()
    return float(correct / total)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--devices", default="2")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=os.path.join("runs", "digits"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Any:
    args = parse_args(argv)
    setup = Connector(
        accelerator=args.accelerator, strategy=args.strategy, devices=args.devices, precision=args.precision
    ).resolve()
    strategy = setup.strategy
    if strategy.launcher is None:
        strategy.setup_environment()
        return train(strategy, args)
    return strategy.launcher.launch(train, strategy, args)


if __name__ == "__main__":
    main()
