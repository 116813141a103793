"""Run by tests/fabric/test_cli.py through `torchloom run` (no torch import: starts fast).

Writes this worker's launch variables and arguments to ``OUT_DIR/rank<RANK>.json``.
"""

import json
import os
import sys

out_dir = sys.argv[1]
names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "OMP_NUM_THREADS")
record: dict[str, object] = {name: os.environ.get(name) for name in names}
record.update({name: value for name, value in os.environ.items() if name.startswith("TORCHLOOM_")})
record["argv"] = sys.argv[2:]
with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as file:
    json.dump(record, file)
