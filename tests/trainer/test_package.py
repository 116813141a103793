"""The trainer distribution stands on core alone."""

from __future__ import annotations

from tests.import_check import HEAVY, modules_loaded_by


def test_import_trainer_does_not_import_fabric_or_optional_packages() -> None:
    loaded = modules_loaded_by("import torchloom.trainer")
    assert "torchloom.fabric" not in loaded
    assert not loaded & set(HEAVY)


def test_versions_match_core() -> None:
    import torchloom.core
    import torchloom.trainer

    assert torchloom.trainer.__version__ == torchloom.core.__version__
