"""The fabric distribution stands on core alone."""

from __future__ import annotations

from tests.import_check import HEAVY, modules_loaded_by


def test_import_fabric_does_not_import_trainer_or_optional_packages() -> None:
    loaded = modules_loaded_by("import torchloom.fabric")
    assert "torchloom.trainer" not in loaded
    assert not loaded & set(HEAVY)


def test_versions_match_core() -> None:
    import torchloom.core
    import torchloom.fabric

    assert torchloom.fabric.__version__ == torchloom.core.__version__
