"""``python -m tools.bench [--quick] [--only SECTIONS] [--json out.json] [--reps N]``: one table, one JSON.

Sections, in this order: ``step`` (single-process step overhead), ``import`` (import time), ``ddp`` (2-rank DDP
step overhead), ``launch`` (time to first step of a 2-rank job), ``memory`` (peak RSS per rank; DDP vs FSDP),
``gpu`` (the CUDA comparisons and GPT tokens/s; skipped without a CUDA device). Default: all of them.
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from pathlib import Path

from tools.bench.common import Row, dump_json, format_table
from tools.bench.ddp_overhead import run_ddp_overhead
from tools.bench.gpu import run_gpu
from tools.bench.import_time import run_import_time
from tools.bench.launch_time import run_launch_time
from tools.bench.memory import run_memory
from tools.bench.step_overhead import run_step_overhead

SECTIONS = ("step", "import", "ddp", "launch", "memory", "gpu")
# full-configuration repetitions (a step or ddp repetition is 8 paired rounds): about 15 minutes on 2 CPU cores
DEFAULT_REPS = {"step": 3, "import": 10, "ddp": 2, "launch": 5, "memory": 2, "gpu": 3}


def parse_sections(text: str) -> list[str]:
    from torchloom.core.errors import choices

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of sections; valid sections (comma-separated): {choices(SECTIONS)}"
        )
    return [name for name in SECTIONS if name in names]  # the suite's order, each once


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid count; valid: a whole number >= 1, such as 3")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description="torchloom against plain PyTorch.")
    parser.add_argument("--quick", action="store_true", help="a tiny configuration that only checks the suite runs")
    parser.add_argument(
        "--only",
        type=parse_sections,
        default=list(SECTIONS),
        help=f"comma-separated sections from {','.join(SECTIONS)}",
    )
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument(
        "--reps",
        type=positive_int,
        help="repetitions of every section (default: 1 with --quick, else "
        + ", ".join(f"{section} {reps}" for section, reps in DEFAULT_REPS.items())
        + ")",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    reps = {section: args.reps or (1 if args.quick else default) for section, default in DEFAULT_REPS.items()}
    runners: dict[str, Callable[[], list[Row]]] = {
        "step": lambda: run_step_overhead(reps["step"], args.quick),
        "import": lambda: run_import_time(reps["import"]),
        "ddp": lambda: run_ddp_overhead(reps["ddp"], args.quick),
        "launch": lambda: run_launch_time(reps["launch"]),
        "memory": lambda: run_memory(reps["memory"], args.quick),
        "gpu": lambda: run_gpu(reps["gpu"], args.quick),
    }
    rows: list[Row] = []
    for section in args.only:
        print(f"running {section} ...", flush=True)
        rows += runners[section]()
    print(format_table(rows), flush=True)
    if args.json is not None:
        settings = {"quick": args.quick, "sections": args.only, "reps": reps, "machine": platform.platform()}
        dump_json(rows, args.json, settings)


if __name__ == "__main__":
    main()
