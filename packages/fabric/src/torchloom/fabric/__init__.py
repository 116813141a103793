"""torchloom-fabric: keep your own training loop; run it on any accelerator, strategy and precision.

``from torchloom.fabric import Fabric``. Importing this package imports no optional dependency
(deepspeed, torch-xla, tensorboard).
"""

from torchloom.fabric.checks import FabricUsageError
from torchloom.fabric.fabric import Fabric
from torchloom.fabric.nonfinite import NonFiniteError, NonFiniteGuard
from torchloom.fabric.preemption import Preemption
from torchloom.fabric.wrappers import FabricDataLoader, FabricModule, FabricOptimizer

__version__ = "0.1.0"

__all__ = [
    "Fabric",
    "FabricDataLoader",
    "FabricModule",
    "FabricOptimizer",
    "FabricUsageError",
    "NonFiniteError",
    "NonFiniteGuard",
    "Preemption",
    "__version__",
]
