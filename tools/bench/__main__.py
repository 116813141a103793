"""``python -m tools.bench [--quick] [--json out.json] [--reps N]``: step overhead and import time, one table."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from tools.bench.common import dump_json, format_table
from tools.bench.import_time import run_import_time
from tools.bench.step_overhead import run_step_overhead


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="torchloom against plain PyTorch: step overhead and import time.")
    parser.add_argument("--quick", action="store_true", help="a tiny configuration that only checks the suite runs")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--reps", type=int, help="repetitions (default: 1 with --quick, else 5)")
    parser.add_argument("--import-reps", type=int, help="import-time repetitions (default: 1 with --quick, else 10)")
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.quick else 5)
    import_reps = args.import_reps or (1 if args.quick else 10)
    rows = run_step_overhead(reps, quick=args.quick) + run_import_time(import_reps)
    print(format_table(rows), flush=True)
    if args.json is not None:
        settings = {"quick": args.quick, "reps": reps, "import_reps": import_reps, "machine": platform.platform()}
        dump_json(rows, args.json, settings)


if __name__ == "__main__":
    main()
