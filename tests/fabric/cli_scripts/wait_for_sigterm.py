"""Run by tests/fabric/test_cli.py through `torchloom run` (no torch import): each worker writes
``OUT_DIR/ready<RANK>``, waits for SIGTERM, then writes ``OUT_DIR/stopped<RANK>`` and exits 0 (as a worker that
saves on preemption would)."""

import os
import signal
import sys
import time

out_dir, rank = sys.argv[1], os.environ["RANK"]
received: list[int] = []
signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
open(os.path.join(out_dir, f"ready{rank}"), "w").close()
deadline = time.monotonic() + 60
while not received and time.monotonic() < deadline:
    time.sleep(0.05)
if received:
    open(os.path.join(out_dir, f"stopped{rank}"), "w").close()
