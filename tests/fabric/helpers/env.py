"""Keeps the environment variables Fabric reads or writes from leaking between tests."""

from __future__ import annotations

import pytest

from torchloom.core.utils.seed import SEED_ENV, SEED_WORKERS_ENV
from torchloom.fabric.connector import CLI_USED_ENV, ENV_VARS

NAMES = (*ENV_VARS.values(), CLI_USED_ENV, SEED_ENV, SEED_WORKERS_ENV, "LOCAL_RANK", "MASTER_PORT", "NODE_RANK")


def clear(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unsets ``NAMES`` for one test and restores them (also values a test's code sets) afterwards."""
    for name in NAMES:
        monkeypatch.setenv(name, "")  # recorded, so whatever the test sets is undone afterwards
        monkeypatch.delenv(name)
