"""`import torchloom.core` stays light: no optional dependency, no product."""

from __future__ import annotations

import pytest

from tests.import_check import HEAVY, modules_loaded_by, modules_loaded_by_each

STATEMENTS = [
    "from torchloom.core import Connector",
    "import torchloom.core.strategies, torchloom.core.accelerators, torchloom.core.precision",
    "import torchloom.core.environments, torchloom.core.launchers, torchloom.core.checkpoint",
    "from torchloom.core.registry import STRATEGIES; STRATEGIES.names()",
    "import torchloom.core.loggers; from torchloom.core.loggers import CSVLogger, TensorBoardLogger",
    "import torchloom.core.data",
]


@pytest.fixture(scope="module")
def loaded_after() -> dict[str, set[str]]:
    """One fresh interpreter runs every statement in turn (each one torch import, not six)."""
    return modules_loaded_by_each(STATEMENTS)


def test_import_core_pulls_no_optional_dependency_and_no_product() -> None:
    loaded = modules_loaded_by("import torchloom.core")
    assert not loaded & set(HEAVY), f"import torchloom.core imported {sorted(loaded & set(HEAVY))}"
    assert "torchloom.fabric" not in loaded
    assert "torchloom.trainer" not in loaded


@pytest.mark.parametrize("statement", STATEMENTS)
def test_core_submodules_pull_no_optional_dependency(statement: str, loaded_after: dict[str, set[str]]) -> None:
    # What is loaded after this statement and the ones before it: a heavy module any of them pulled fails
    # this statement too, so nothing a statement pulls on its own can hide behind an earlier statement.
    loaded = loaded_after[statement]
    assert not loaded & set(HEAVY), (
        f"{statement!r} (run after {STATEMENTS[: STATEMENTS.index(statement)]}) imported {sorted(loaded & set(HEAVY))}"
    )
