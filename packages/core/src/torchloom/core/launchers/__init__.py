"""Launchers: how the worker processes of a job come to exist (torch elastic, torch.multiprocessing)."""

from __future__ import annotations

from torchloom.core.launchers.launcher import Launcher
from torchloom.core.launchers.multiprocessing import MultiprocessingLauncher
from torchloom.core.launchers.subprocess_script import SubprocessScriptLauncher

__all__ = ["Launcher", "MultiprocessingLauncher", "SubprocessScriptLauncher"]
