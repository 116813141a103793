"""Consolidation: a sharded checkpoint directory -> one file that ``torch.load(weights_only=True)`` reads.

Two kinds of directory: DCP's (FSDP, model parallel) and DeepSpeed's (ZeRO partitions, gathered by
DeepSpeed's ``zero_to_fp32`` into float32 weights; its partitioned optimizer state is left out).

Runs in one process, without a process group, whatever number of ranks wrote the checkpoint. The file
has the nested structure a full (single-file) save writes: full-size tensors, module state dicts, and
optimizer states in ``optimizer.state_dict()``'s form, so it loads into an unsharded model anywhere.
It needs memory for the whole checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from torchloom.core.checkpoint.deepspeed import is_deepspeed_checkpoint, load_consolidated
from torchloom.core.checkpoint.distributed import is_sharded_checkpoint, load_sharded
from torchloom.core.checkpoint.io import TorchCheckpointIO
from torchloom.core.errors import ConfigurationError

__all__ = ["consolidate"]


def consolidate(
    checkpoint_dir: str | os.PathLike[str], output_file: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Writes the sharded checkpoint ``checkpoint_dir`` as the single file ``output_file``; returns its path.

    An existing ``output_file`` is replaced only with ``overwrite=True``; the write is atomic.
    """
    source, target = Path(checkpoint_dir), Path(output_file)
    if not source.is_dir():
        raise ConfigurationError(f"CHECKPOINT_DIR {str(source)!r} is not a directory. Valid: a sharded checkpoint.")
    deepspeed = is_deepspeed_checkpoint(source)
    if not deepspeed and not is_sharded_checkpoint(source):
        raise ConfigurationError(
            f"CHECKPOINT_DIR {str(source)!r} is not a torchloom sharded checkpoint (it lacks torchloom's metadata "
            "file and DCP's '.metadata', or DeepSpeed's 'latest' and torchloom's extra state). Valid: a directory "
            "saved with state_dict_type='sharded', or by DeepSpeedStrategy."
        )
    if target.is_dir():
        raise ConfigurationError(f"OUTPUT_FILE {str(target)!r} is a directory. Valid: the path of a file to write.")
    if target.exists() and not overwrite:
        raise ConfigurationError(
            f"OUTPUT_FILE {str(target)!r} exists already. Valid: a new path, or overwrite=True to replace it."
        )
    checkpoint = load_consolidated(source) if deepspeed else load_sharded(source, distributed=False)
    TorchCheckpointIO().save_checkpoint(checkpoint, target)
    return target
