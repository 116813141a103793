"""Checkpoint I/O: whole-file atomic torch saves (sharded DCP checkpoints live in distributed.py)."""

from torchloom.core.checkpoint.io import CheckpointIO, TorchCheckpointIO

__all__ = ["CheckpointIO", "TorchCheckpointIO"]
