"""Loggers shared by Fabric and the Trainer: rank-zero only, one folder per run version.

Importing this package never imports tensorboard; ``TensorBoardLogger`` imports it when built.
"""

from __future__ import annotations

from torchloom.core.loggers.csv import CSVLogger
from torchloom.core.loggers.logger import FINALIZE_STATUSES, Logger
from torchloom.core.loggers.tensorboard import TensorBoardLogger

__all__ = ["FINALIZE_STATUSES", "CSVLogger", "Logger", "TensorBoardLogger"]
