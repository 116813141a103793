"""`import torchloom.core` stays light: no optional dependency, no product."""

from __future__ import annotations

import pytest

from tests.import_check import HEAVY, modules_loaded_by


def test_import_core_pulls_no_optional_dependency_and_no_product() -> None:
    loaded = modules_loaded_by("import torchloom.core")
    assert not loaded & set(HEAVY), f"import torchloom.core imported {sorted(loaded & set(HEAVY))}"
    assert "torchloom.fabric" not in loaded
    assert "torchloom.trainer" not in loaded


@pytest.mark.parametrize(
    "statement",
    [
        "from torchloom.core import Connector",
        "import torchloom.core.strategies, torchloom.core.accelerators, torchloom.core.precision",
        "import torchloom.core.environments, torchloom.core.launchers, torchloom.core.checkpoint",
        "from torchloom.core.registry import STRATEGIES; STRATEGIES.names()",
        "import torchloom.core.loggers; from torchloom.core.loggers import CSVLogger, TensorBoardLogger",
        "import torchloom.core.data",
    ],
)
def test_core_submodules_pull_no_optional_dependency(statement: str) -> None:
    loaded = modules_loaded_by(statement)
    assert not loaded & set(HEAVY), f"{statement!r} imported {sorted(loaded & set(HEAVY))}"
