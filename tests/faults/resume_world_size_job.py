"""A 2-rank DDP fit of ``test_resume_world_size.IdModel`` over ``Ids(N)``, run by that test as
``python resume_world_size_job.py OUT TAG MAX_STEPS CKPT`` (re-run as 2 workers by the ``ddp`` strategy).

Each rank appends the ids of its training batches to ``OUT/TAG-rank<R>.jsonl``. ``MAX_STEPS`` > 0 stops
there, saving ``OUT/TAG.ckpt`` at that step (mid-epoch); ``CKPT`` (or ``-``) is the checkpoint to resume from.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.faults.test_resume_world_size import fit_ids


def main(out: Path, tag: str, max_steps: int, ckpt: str) -> None:
    fit_ids(out, tag, devices=2, max_steps=max_steps, ckpt_path=None if ckpt == "-" else ckpt)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4])
