"""Tiny datasets for dataloader tests."""

from __future__ import annotations

from typing import cast

from torch.utils.data import Dataset


def numbers(count: int) -> Dataset[int]:
    """``0 .. count-1``: a list is a map-style dataset (len and indexing), typed as one."""
    return cast(Dataset[int], list(range(count)))
