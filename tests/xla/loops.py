"""The small training runs the XLA tests compare against the same runs on the CPU."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchloom.fabric import Fabric
from torchloom.trainer import LoomModule, Trainer

STEPS = 6
BATCH = 8


def dataset(n: int = STEPS * BATCH) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=generator)
    return TensorDataset(x, x[:, :2].sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=generator))


def model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def cpu_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().float().cpu() for name, tensor in state.items()}


def fabric_run(fabric: Fabric, clip: float | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Trains ``model()`` with SGD for one pass over ``dataset()``; returns the weights (on the CPU) and losses."""
    built = model()
    module, optimizer = fabric.setup(built, torch.optim.SGD(built.parameters(), lr=0.1))
    loader = fabric.setup_dataloaders(DataLoader(dataset(), batch_size=BATCH))
    losses = []
    for x, y in loader:
        loss = nn.functional.mse_loss(module(x), y)
        fabric.backward(loss)
        if clip is not None:
            fabric.clip_gradients(module, optimizer, max_norm=clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.item()))
    return cpu_weights(module.state_dict()), losses


class Regressor(LoomModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # FSDPv2 wraps only modules that define forward
        output: torch.Tensor = self.net(x)
        return output

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer_run(root: str, **kwargs: Any) -> tuple[Trainer, Regressor]:
    module = Regressor()
    trainer = Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=root,
        **kwargs,
    )
    data = DataLoader(dataset(), batch_size=BATCH)
    trainer.fit(module, train_dataloaders=data, val_dataloaders=DataLoader(dataset(16), batch_size=BATCH))
    return trainer, module
