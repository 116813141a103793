"""Shared by the import tests: import a module in a fresh interpreter and report what came with it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

HEAVY = ("deepspeed", "torch_xla", "tensorboard", "tensorboardX", "torch._dynamo", "sklearn")


def modules_loaded_by(statement: str) -> set[str]:
    """The top-level and heavy module names present in ``sys.modules`` after running ``statement``."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def modules_loaded_by_each(statements: Sequence[str]) -> dict[str, set[str]]:
    """``statements`` run in turn in one fresh interpreter: what ``sys.modules`` holds after each (cumulative).

    A heavy module that any statement pulls is in the set of that statement and of every later one.
    """
    lines = ["import json as _json, sys as _sys"]
    for statement in statements:
        lines += [statement, "print(_json.dumps(sorted(_sys.modules)))"]
    out = subprocess.run(
        [sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, timeout=120, check=True
    )
    printed = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert len(printed) == len(statements), out.stdout
    return {statement: set(json.loads(line)) for statement, line in zip(statements, printed)}
