"""Capturing and restoring every random generator a training step uses, in a weights_only-loadable form.

An exact resume needs the random state twice: at the start of the interrupted epoch (the shuffled
order of its batches is drawn from it) and at save time (dropout and the like continue from it).
The states are plain lists, ints and tensors, so checkpoints holding them load with ``weights_only=True``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's generators (CUDA's too, once CUDA is in use)."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": [int(x) for x in numpy_state["state"]["key"]],
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Sets the generators back to ``state`` (what ``capture_rng`` returned); missing parts stay as they are."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    if "numpy" in state:
        saved = state["numpy"]
        np.random.set_state(
            (
                saved["bit_generator"],
                np.array(saved["key"], dtype=np.uint32),
                saved["pos"],
                saved["has_gauss"],
                saved["gauss"],
            )
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
