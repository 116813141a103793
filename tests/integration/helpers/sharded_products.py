"""One product trains a small model with ``FSDPStrategy`` on 2 forked gloo ranks and saves a full checkpoint.

``python sharded_products.py fabric|trainer OUT_FILE``. Same model, data, seed and optimizer in both: the test
compares the two files (and a plain single-process run) weight by weight.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from torchloom.core.strategies import FSDPStrategy

STEPS = 4
BATCH = 8  # per rank


def build() -> tuple[torch.nn.Module, DataLoader[tuple[torch.Tensor, ...]]]:
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    data = TensorDataset(torch.randn(2 * BATCH * STEPS, 6), torch.randint(0, 3, (2 * BATCH * STEPS,)))
    return model, DataLoader(data, batch_size=BATCH, shuffle=False)


def strategy() -> FSDPStrategy:
    return FSDPStrategy(start_method="fork", state_dict_type="full", auto_wrap_policy={torch.nn.Linear})


def run_fabric(out: str) -> None:
    from torchloom.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy())

    def train(fabric: Fabric) -> None:
        model, loader = build()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        model, optimizer = fabric.setup(model, optimizer)
        for inputs, labels in fabric.setup_dataloaders(loader):
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
        fabric.save(out, {"model": model})

    fabric.launch(train)


def run_trainer(out: str) -> None:
    from torchloom.trainer import LoomModule, Trainer

    class Classifier(LoomModule):
        def __init__(self) -> None:
            super().__init__()
            self.network, self.loader = build()

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            inputs, labels = batch
            return F.cross_entropy(self.network(inputs), labels)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

        def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
            return self.loader

        def on_train_end(self) -> None:
            self.trainer.save_checkpoint(out)

    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy(),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier())


if __name__ == "__main__":
    product, out = sys.argv[1], sys.argv[2]
    {"fabric": run_fabric, "trainer": run_trainer}[product](out)
