"""XLACheckpointIO: one checkpoint file written through torch-xla's ``xm.save``, atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from typing_extensions import override

from torchloom.core.accelerators.xla import import_torch_xla
from torchloom.core.checkpoint.io import TorchCheckpointIO

__all__ = ["XLACheckpointIO"]


class XLACheckpointIO(TorchCheckpointIO):
    """``xm.save`` (which finishes pending XLA work and brings the tensors to the CPU in one transfer) into a
    temp file beside the target, fsync, then rename over it. Loading is ``TorchCheckpointIO``'s: the file
    holds CPU tensors, and ``load_state_dict`` copies them onto the XLA devices.

    The strategy decides which process writes; ``xm.save`` is therefore called with ``master_only=False``.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> None:
        xm = import_torch_xla("torch_xla.core.xla_model", "XLACheckpointIO")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                xm.save(checkpoint, f, master_only=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
