"""Two DDP ranks (``python nonfinite_job.py OUT``, re-run as 2 workers) fit with NonFiniteGuard(mode="stop"); only rank 1
produces a NaN loss, at global step 5. Each rank writes the error it got to ``OUT/rank<R>.txt``."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.faults.test_nonfinite import Regressor, loader
from torchloom.trainer import Trainer
from torchloom.trainer.callbacks import NonFiniteGuard


def main(out: Path) -> None:
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                      callbacks=[NonFiniteGuard("stop", check_every_n_steps=4)])  # fmt: skip
    module = Regressor(nan_at_step=5, nan_on_rank=1)
    try:
        trainer.fit(module, loader())
        message = "no error"
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
    (out / f"rank{trainer.global_rank}.txt").write_text(message)  # the fit's teardown ended the group already


if __name__ == "__main__":
    main(Path(sys.argv[1]))
