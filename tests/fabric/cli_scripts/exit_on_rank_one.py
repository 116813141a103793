"""Run by tests/fabric/test_cli.py through `torchloom run`: rank 1 fails with exit code 3."""

import os
import sys

if os.environ["RANK"] == "1":
    print("rank 1 gives up", file=sys.stderr)
    sys.exit(3)
