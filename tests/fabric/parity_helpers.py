"""One training loop written twice: with Fabric, and in plain PyTorch (plain DDP for several ranks).

Both loops: a seeded model with dropout, SGD with momentum, a shuffled dataloader over 2 epochs,
gradient accumulation over ``ACCUMULATE`` micro-batches (without a gradient sync before the last),
gradient clipping by norm, and the precision's autocast / grad scaler. The plain loop mirrors what
the precision plugins do: ``MixedPrecision.forward_context`` is ``torch.autocast("cpu", dtype)``,
``convert_output`` casts float16/bfloat16 outputs to float32 (so the loss is computed outside
autocast, in float32), ``16-mixed`` scales the loss, unscales before clipping and steps through
``GradScaler.step`` + ``update``.

Run as a script (``python parity_helpers.py OUT_DIR``) it is the 2-rank job: ``fabric.launch()``
re-runs it as 2 workers (strategy "ddp"); each runs the Fabric loop and then the plain DDP loop
for every precision and saves the results to ``OUT_DIR/<precision>-<fabric|plain>-rank<r>.pt``.
The test runs these loops in the workers of ``helpers/ddp_script.py`` (``run_ddp_loops``): one launch for both.
"""

from __future__ import annotations

import contextlib
import datetime
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torchloom.core.strategies.ddp import DDPStrategy
from torchloom.fabric import Fabric

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
SEED = 1234
EPOCHS = 2
BATCH_SIZE = 4
ACCUMULATE = 2
LR = 0.1
MAX_NORM = 1.0
_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.2),  # draws from the global generator: both loops must consume it identically
        nn.Linear(4 * 6 * 6, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


def make_dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(99)
    images = 200 * torch.randn(64, 1, 6, 6, generator=generator)  # large inputs: 16-mixed's first steps overflow
    return TensorDataset(images, torch.randint(0, 5, (64,), generator=generator))


def weights(model: nn.Module) -> dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def run_fabric(fabric: Fabric) -> dict[str, Any]:
    """The loop with Fabric; returns the initial and final weights and the grad scaler's final scale."""
    fabric.seed_everything(SEED)
    model = make_model()
    initial = weights(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    fmodel, foptimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(make_dataset(), batch_size=BATCH_SIZE, shuffle=True))
    for _ in range(EPOCHS):
        for index, (images, labels) in enumerate(loader):
            is_last = index % ACCUMULATE == ACCUMULATE - 1
            with fabric.no_backward_sync(fmodel, enabled=not is_last):
                loss = F.cross_entropy(fmodel(images), labels) / ACCUMULATE
                fabric.backward(loss)
            if is_last:
                fabric.clip_gradients(fmodel, foptimizer, max_norm=MAX_NORM, error_if_nonfinite=False)
                foptimizer.step()
                foptimizer.zero_grad()
    scaler = getattr(fabric.precision, "scaler", None)
    return {"initial": initial, "final": weights(fmodel), "scale": None if scaler is None else scaler.get_scale()}


def run_plain(precision: str, distributed: bool = False) -> dict[str, Any]:
    """The same loop in plain PyTorch; ``distributed`` uses DDP over the existing default process group."""
    torch.manual_seed(SEED)
    model = make_model()
    initial = weights(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    ddp = DistributedDataParallel(model) if distributed else None
    forward_model = model if ddp is None else ddp
    dataset = make_dataset()
    sampler: DistributedSampler[Any] | None = None
    if distributed:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=SEED)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=sampler is None, sampler=sampler)
    dtype = _AUTOCAST_DTYPES.get(precision)
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    for epoch in range(EPOCHS):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for index, (images, labels) in enumerate(loader):
            is_last = index % ACCUMULATE == ACCUMULATE - 1
            no_sync = ddp.no_sync() if ddp is not None and not is_last else contextlib.nullcontext()
            with no_sync:
                autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
                with autocast:
                    output = forward_model(images)
                if dtype is not None:
                    output = output.float()
                loss = F.cross_entropy(output, labels) / ACCUMULATE
                torch.autograd.backward(scaler.scale(loss) if scaler is not None else loss)
            if is_last:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, error_if_nonfinite=False)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad()
    return {"initial": initial, "final": weights(model), "scale": None if scaler is None else scaler.get_scale()}


def ddp_fabric(precision: str) -> Fabric:
    strategy = DDPStrategy(timeout=datetime.timedelta(seconds=60))  # start method "popen": strategy "ddp"
    return Fabric(accelerator="cpu", strategy=strategy, devices=2, precision=precision)


def main(out_dir: Path) -> None:
    ddp_fabric(PRECISIONS[0]).launch()  # runs this script again as 2 workers; this process exits here
    run_ddp_loops(out_dir)


def run_ddp_loops(out_dir: Path) -> None:
    """In each worker of a 2-rank job: both loops in every precision, saved for the test to compare."""
    rank = torch.distributed.get_rank()
    for precision in PRECISIONS:
        fabric = ddp_fabric(precision)
        fabric.launch()  # in a worker already: sets this Fabric up on the existing process group
        torch.save(run_fabric(fabric), out_dir / f"{precision}-fabric-rank{rank}.pt")
        torch.save(run_plain(precision, distributed=True), out_dir / f"{precision}-plain-rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
