"""torchloom-fabric: keep your own training loop; run it on any accelerator, strategy and precision.

The `Fabric` class arrives with the Fabric issue; this distribution already installs and depends
only on `torchloom-core`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
