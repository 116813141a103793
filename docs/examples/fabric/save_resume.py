"""Save a run, resume it in a fresh process, and check it ends exactly where an uninterrupted run does.

    python docs/examples/fabric/save_resume.py            # 60 steps; saves a checkpoint after step 30
    python docs/examples/fabric/save_resume.py --resume   # a new process: loads it, trains to 60, compares

    # the same on 2 processes in mixed precision:
    python docs/examples/fabric/save_resume.py --strategy ddp --devices 2 --precision 16-mixed
    python docs/examples/fabric/save_resume.py --strategy ddp --devices 2 --precision 16-mixed --resume

The first run trains all the way, as if never interrupted, and also saves its final weights; the
second starts in a new process from the checkpoint and compares its final weights with those.

The resumed run is bit-identical to an uninterrupted one because the checkpoint holds everything the
next step depends on: the weights, the optimizer's state (Adam's moment estimates), the step count
and the precision (the grad scaler's scale under 16-mixed). The data order is a function of
(seed, epoch) alone, so the resumed run skips the batches of the current epoch it has seen already.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from torchloom.fabric import Fabric

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # docs/examples: the shared digits.py
from digits import DigitsCNN, load_digits_split


def build(fabric: Fabric, args: argparse.Namespace) -> dict[str, Any]:
    """A fresh model, optimizer and loader: the state a run starts from (the resumed one then loads into it)."""
    fabric.seed_everything(args.seed)
    train_set, _ = load_digits_split(seed=args.seed)
    # The order depends on (seed, epoch) only, never on how many random numbers were drawn before:
    # a resumed process replays an epoch's order without restoring any random generator.
    # (Fabric keeps a DistributedSampler it is given; this one is set up for any number of processes.)
    loader = fabric.setup_dataloaders(
        DataLoader(
            train_set,
            batch_size=args.batch_size,
            sampler=DistributedSampler(
                train_set, num_replicas=fabric.world_size, rank=fabric.global_rank, shuffle=True, seed=args.seed
            ),
        )
    )
    model = DigitsCNN()
    model, optimizer = fabric.setup(model, torch.optim.Adam(model.parameters(), lr=args.lr))
    return {"model": model, "optimizer": optimizer, "loader": loader, "step": 0}


def train_until(fabric: Fabric, run: dict[str, Any], stop: int) -> None:
    """Trains from ``run["step"]`` up to step ``stop``, starting mid-epoch where the step count says so."""
    model, optimizer, loader = run["model"], run["optimizer"], run["loader"]
    while run["step"] < stop:
        epoch, seen = divmod(run["step"], len(loader))
        loader.set_epoch(epoch)
        for images, labels in itertools.islice(loader, seen, None):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            run["step"] += 1
            if run["step"] == stop:
                break


def checkpoint_state(fabric: Fabric, run: dict[str, Any]) -> dict[str, Any]:
    """What the checkpoint holds (the loader is rebuilt, not saved: its order depends on the epoch only)."""
    return {"model": run["model"], "optimizer": run["optimizer"], "step": run["step"], "precision": fabric.precision}


def main_process(fabric: Fabric, args: argparse.Namespace) -> bool:
    """Runs in every process; returns whether the resumed run matched (``True`` for the first run)."""
    checkpoint = Path(args.out, "checkpoint.pt").resolve()
    final = Path(args.out, "uninterrupted.pt").resolve()
    run = build(fabric, args)
    if not args.resume:
        train_until(fabric, run, args.save_at)
        fabric.save(checkpoint, checkpoint_state(fabric, run))
        train_until(fabric, run, args.steps)  # carry on as if nothing happened: the run to compare with
        fabric.save(final, {"model": run["model"]})
        fabric.print(f"checkpoint after step {args.save_at} of {args.steps}: {checkpoint}")
        fabric.print(f"weights after step {args.steps}, uninterrupted: {final}")
        fabric.print(f"resume in a new process: python {sys.argv[0]} {' '.join([*sys.argv[1:], '--resume'])}")
        return True

    state = checkpoint_state(fabric, run)
    fabric.load(checkpoint, state)  # restores model, optimizer and precision in place; plain values into `state`
    run["step"] = resumed_at = state["step"]
    fabric.print(f"resumed from {checkpoint} at step {resumed_at}")
    train_until(fabric, run, args.steps)

    expected = fabric.load(final)["model"]  # without a state to restore into, load returns the checkpoint
    weights = run["model"].state_dict()
    identical = all(torch.equal(weights[name], tensor) for name, tensor in expected.items())
    fabric.print(
        f"resumed at step {resumed_at} and trained to step {args.steps} ({fabric.world_size} process(es), "
        f"{fabric.precision.name}); weights equal to the uninterrupted run's: "
        + ("yes, bit for bit" if identical else "NO")
        + f" ({len(expected)} tensors compared with torch.equal)"
    )
    return identical


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Save a Fabric run, resume it, compare with an uninterrupted run.")
    parser.add_argument("--resume", action="store_true", help="load the checkpoint, finish the run and compare")
    parser.add_argument("--save-at", type=int, default=30, help="the step after which the first run saves a checkpoint")
    parser.add_argument("--steps", type=int, default=60, help="steps of the whole run")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", default="1")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", default=os.path.join("runs", "save_resume"), help="where the checkpoint goes")
    args = parser.parse_args(argv)
    if not 0 < args.save_at < args.steps:
        parser.error(f"--save-at {args.save_at} must be between 1 and --steps - 1 ({args.steps - 1})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fabric = Fabric(
        accelerator=args.accelerator, strategy=args.strategy, devices=args.devices, precision=args.precision
    )
    if not fabric.launch(main_process, args):
        sys.exit(1)


if __name__ == "__main__":
    main()
