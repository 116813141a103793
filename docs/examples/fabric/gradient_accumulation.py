"""Gradient accumulation with Fabric: several micro-batches per optimizer step, one gradient sync per step.

    python docs/examples/fabric/gradient_accumulation.py                     # DDP, 2 CPU processes
    python docs/examples/fabric/gradient_accumulation.py --accumulate 8 --micro-batch-size 8

Inside ``fabric.no_backward_sync(model, enabled=not is_last)`` a backward pass only adds to this
process's own gradients; the backward of the last micro-batch averages the sums across processes.
The script checks both halves and prints the result:

- before the last micro-batch the processes' gradients differ (nothing was communicated), after it
  they are identical (synced once per step);
- the final weights match a plain model in one process that took every step on the whole global
  batch (all processes' micro-batches at once): accumulating is the same as a larger batch.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from torchloom.fabric import Fabric

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # docs/examples: the shared digits.py
from digits import DigitsCNN, load_digits_split


def train(fabric: Fabric, args: argparse.Namespace) -> bool:
    """Runs in every process; returns whether every check passed."""
    fabric.seed_everything(args.seed)
    train_set, _ = load_digits_split(seed=args.seed)
    # drop_last: every micro-batch has the same size, so the mean of the micro-batch means is the global mean
    loader = fabric.setup_dataloaders(
        DataLoader(train_set, batch_size=args.micro_batch_size, shuffle=True, drop_last=True)
    )
    model = DigitsCNN()  # the same initial weights in every process (seeded)
    reference = copy.deepcopy(model)  # plain PyTorch, not set up: steps on the whole global batch
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=args.lr, momentum=0.9)
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9))

    micro_batches = endless(loader)
    differed_before_sync, identical_after_sync = True, True
    for step in range(args.steps):
        global_batch = []
        for index in range(args.accumulate):
            images, labels = next(micro_batches)
            is_last = index == args.accumulate - 1
            # The forward pass belongs inside too: DDP decides in forward whether the next backward syncs.
            with fabric.no_backward_sync(model, enabled=not is_last):
                loss = F.cross_entropy(model(images), labels) / args.accumulate  # the step's mean over micro-batches
                fabric.backward(loss)
            gathered = fabric.all_gather(flat_gradients(model))  # one row per process
            same_everywhere = all(torch.equal(gathered[0], row) for row in gathered)
            if is_last:
                identical_after_sync &= same_everywhere
            elif fabric.world_size > 1:
                differed_before_sync &= not same_everywhere
            global_batch.append(fabric.all_gather((images, labels)))
        optimizer.step()
        optimizer.zero_grad()
        reference_loss = reference_step(reference, reference_optimizer, global_batch)
        fabric.print(f"step {step + 1:2d}/{args.steps}  loss on the global batch {reference_loss:.4f}")

    difference = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), reference.parameters()))
    world = fabric.world_size
    before = "yes (not synced)" if differed_before_sync else "NO"
    if world == 1:
        before = "n/a (one process)"  # nothing to sync with
    fabric.print(
        f"each step: {args.accumulate} micro-batches of {args.micro_batch_size} in each of {world} process(es) "
        f"= a global batch of {args.accumulate * args.micro_batch_size * world}\n"
        f"gradients differed across processes before the last micro-batch: {before}\n"
        f"gradients identical across processes after the last micro-batch: {'yes' if identical_after_sync else 'NO'}\n"
        f"weights vs. one process stepping on the whole global batch: max |difference| {difference:.2e} "
        f"({'match' if difference < args.tolerance else 'MISMATCH'}, tolerance {args.tolerance:.0e})"
    )
    return differed_before_sync and identical_after_sync and difference < args.tolerance


def endless(loader: Iterable[Any]) -> Iterator[Any]:
    """Micro-batches across epoch boundaries (each pass over a FabricDataLoader reshuffles)."""
    while True:
        yield from loader


def flat_gradients(model: nn.Module) -> torch.Tensor:
    return torch.cat([parameter.grad.flatten() for parameter in model.parameters() if parameter.grad is not None])


def reference_step(model: nn.Module, optimizer: torch.optim.Optimizer, global_batch: list[Any]) -> float:
    """One plain step on every process's micro-batches at once (``global_batch``: gathered [world, ...] pairs)."""
    images = torch.cat([gathered_images.flatten(0, 1) for gathered_images, _ in global_batch])
    labels = torch.cat([gathered_labels.flatten(0, 1) for _, gathered_labels in global_batch])
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    torch.autograd.backward(loss)  # plain PyTorch: the same as loss.backward()
    optimizer.step()
    return float(loss.item())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Gradient accumulation with fabric.no_backward_sync.")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--devices", default="2")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=16, help="per process")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=1e-5, help="float rounding differs between the two sums")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fabric = Fabric(accelerator=args.accelerator, strategy=args.strategy, devices=args.devices)
    if not fabric.launch(train, args):
        sys.exit(1)


if __name__ == "__main__":
    main()
