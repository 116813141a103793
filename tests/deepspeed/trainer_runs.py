"""Two ranks (``python trainer_runs.py OUT``, re-run as 2 workers by the popen launcher) fit with the Trainer under
DeepSpeed, in one job:

1. parity: ZeRO stage 2, float32, ``accumulate_grad_batches=2`` and ``gradient_clip_val`` (DeepSpeed's clipping,
   through the config) for 2 epochs; rank 0 records the final weights next to a plain PyTorch loop's on the
   whole batches, with clipping by the global norm;
2. exact resume: ZeRO stage 3, layers built in ``configure_model`` (partitioned as they are built by
   ``zero.Init``), AdamW + a step scheduler, a checkpoint directory per epoch; 4 epochs straight, and a new
   Trainer resuming from the epoch-2 directory to epoch 4; then ``test`` on the same module (the engine is
   kept, not built twice).

Rank 0 writes ``OUT/results.json``; the test asserts on it and reads the checkpoint directories itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from torchloom.trainer import LoomModule, Trainer
from torchloom.trainer.callbacks import ModelCheckpoint

QUIET: dict[str, Any] = {"accelerator": "cpu", "devices": 2, "logger": False, "enable_progress_bar": False}
CLIP, LR = 0.3, 0.05


def dataset(seed: int = 0, n: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, 2 * x[:, :2].sum(dim=1, keepdim=True) - x[:, 2:].sum(dim=1, keepdim=True))


def build() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


class Regressor(LoomModule):
    def __init__(self, late: bool = False, scheduler: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layers: nn.Module | None = None if late else build()

    def configure_model(self) -> None:
        if self.layers is None:
            self.layers = build()
            sizes = [(p.numel(), getattr(p, "ds_numel", p.numel())) for p in self.layers.parameters()]
            self.built_partitioned = all(local < full for local, full in sizes if full > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.layers is not None
        out: torch.Tensor = self.layers(x)
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x).float(), y), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x).float(), y), sync_dist=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=LR)
        if not self.hparams["scheduler"]:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 3, gamma=0.5)}


def plain_reference(epochs: int, batch_size: int, accumulate: int, clip: float = CLIP) -> dict[str, torch.Tensor]:
    """One process, whole batches (both ranks' halves), the same accumulation and global-norm clipping."""
    torch.manual_seed(3)
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    data = dataset()
    x, y = data.tensors
    batches = [(x[i : i + 2 * batch_size], y[i : i + 2 * batch_size]) for i in range(0, len(x), 2 * batch_size)]
    for _ in range(epochs):
        # a DistributedSampler without shuffling: rank r takes items r, r+2, ... so each global batch is a
        # contiguous block of 2 * batch_size items, in another order (the loss is a mean: order does not matter)
        for index, (bx, by) in enumerate(batches):
            (nn.functional.mse_loss(model(bx), by) / accumulate).backward()
            if (index + 1) % accumulate == 0 or index == len(batches) - 1:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                optimizer.zero_grad()
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def weights_of(trainer: Trainer, module: LoomModule) -> dict[str, torch.Tensor]:
    state = trainer._adapter.module_state_dict(module)
    return {key.removeprefix("layers."): value.float().clone() for key, value in state.items()}


def loader(batch_size: int) -> DataLoader[Any]:
    return DataLoader(dataset(), batch_size=batch_size)


def parity(out: Path) -> dict[str, Any]:
    torch.manual_seed(3)
    module = Regressor()
    trainer = Trainer(strategy="deepspeed_stage_2", max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=CLIP,
                      enable_checkpointing=False, num_sanity_val_steps=0, **QUIET)  # fmt: skip
    trainer.fit(module, loader(4))
    result: dict[str, Any] = {"global_step": trainer.global_step}
    weights = weights_of(trainer, module)
    if trainer.global_rank == 0:
        reference = plain_reference(epochs=2, batch_size=4, accumulate=2)
        result["reference_diff"] = max((weights[k] - reference[k]).abs().max().item() for k in reference)
        unclipped = plain_reference(epochs=2, batch_size=4, accumulate=2, clip=float("inf"))
        result["unclipped_diff"] = max((weights[k] - unclipped[k]).abs().max().item() for k in unclipped)
    return result


def resume(out: Path) -> dict[str, Any]:
    def trainer(epochs: int, folder: str) -> Trainer:
        checkpoint = ModelCheckpoint(dirpath=out / folder, filename="{epoch}", save_top_k=-1, save_last=True)
        return Trainer(strategy="deepspeed_stage_3", precision="bf16-mixed", max_epochs=epochs,
                       callbacks=[checkpoint], **QUIET)  # fmt: skip

    torch.manual_seed(5)
    straight = Regressor(late=True, scheduler=True)
    first = trainer(4, "straight")
    first.fit(straight, loader(4), loader(8))
    result: dict[str, Any] = {
        "built_partitioned": straight.built_partitioned,
        "straight_step": first.global_step,
        "straight_metrics": {k: float(v) for k, v in first.callback_metrics.items()},
    }
    straight_weights = weights_of(first, straight)
    tested = first.test(straight, loader(8))
    result["test_loss"] = tested[0]["test_loss"]

    torch.manual_seed(99)  # other initial weights: the checkpoint must replace them
    resumed = Regressor(late=True, scheduler=True)
    second = trainer(4, "resumed")
    second.fit(resumed, loader(4), loader(8), ckpt_path=out / "straight" / "epoch=1.ckpt")
    resumed_weights = weights_of(second, resumed)
    result["resumed_step"] = second.global_step
    result["resumed_metrics"] = {k: float(v) for k, v in second.callback_metrics.items()}
    result["resume_diff"] = max((straight_weights[k] - resumed_weights[k]).abs().max().item() for k in straight_weights)
    result["lr"] = second.optimizers[0].param_groups[0]["lr"]
    if second.global_rank == 0:
        torch.save({k: v.clone() for k, v in straight_weights.items()}, out / "straight_weights.pt")
    return result


def main(out: Path) -> None:
    results = {"parity": parity(out), "resume": resume(out)}
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
