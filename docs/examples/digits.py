"""What the examples share: scikit-learn's bundled 8x8 digits as 1x8x8 images, and a small CNN.

The data ships inside scikit-learn (1797 images), so nothing is downloaded. The split is fixed by
``seed`` and is the same in every process, so each rank can build the datasets itself. The scripts in
``fabric/`` and ``trainer/`` import this file by putting this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["DigitsCNN", "load_digits_split", "load_digits_tensors", "split_digits"]


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: images ``[N, 1, 8, 8]`` scaled to [0, 1] (float32) and labels ``[N]`` (int64)."""
    from sklearn.datasets import load_digits  # imported here: only the examples need scikit-learn

    pixels, labels = load_digits(return_X_y=True)
    images = torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0  # pixel values are 0..16
    return images, torch.tensor(labels, dtype=torch.long)


def split_digits(
    images: torch.Tensor, labels: torch.Tensor, seed: int = 0, held_out: float = 0.2
) -> tuple[TensorDataset, TensorDataset]:
    """(train, held-out) datasets of ``(image, label)``, split at random by ``seed``."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = round((1 - held_out) * len(order))
    train, test = order[:cut], order[cut:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


def load_digits_split(seed: int = 0, held_out: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """(train, held-out) datasets of ``(image [1, 8, 8] in [0, 1], label)``, split at random by ``seed``."""
    return split_digits(*load_digits_tensors(), seed=seed, held_out=held_out)


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool, two linear layers: about 40k parameters, 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(images))
        return logits


def add_hardware_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both examples share: where and how to run (DDP on 2 CPU processes by default)."""
    parser.add_argument("--accelerator", default="cpu", help="cpu, cuda, mps, auto, ... (default: cpu)")
    parser.add_argument("--strategy", default="ddp", help="ddp, ddp_spawn, auto, ... (default: ddp)")
    parser.add_argument("--devices", default="2", help="how many devices (processes), or a list (default: 2)")
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed, ... (default: 32-true)")


def tensorboard_program() -> str:
    """``tensorboard``, by its full path when it is installed beside this Python (a venv the shell may not have on PATH)."""
    beside = Path(sys.executable).parent / "tensorboard"
    return str(beside) if beside.is_file() else "tensorboard"
