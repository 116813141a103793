"""torchloom-trainer: `Trainer` + `LoomModule`, the training loop written for you.

The `Trainer` arrives with the Trainer issue; this distribution already installs and depends only
on `torchloom-core`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
