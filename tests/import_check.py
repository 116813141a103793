"""Shared by the import tests: import a module in a fresh interpreter and report what came with it."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("deepspeed", "torch_xla", "tensorboard", "tensorboardX", "torch._dynamo", "sklearn")


def modules_loaded_by(statement: str) -> set[str]:
    """The top-level and heavy module names present in ``sys.modules`` after running ``statement``."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))
