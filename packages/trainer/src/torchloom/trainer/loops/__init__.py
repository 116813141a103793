"""The Trainer's loops: fit (epochs of training batches, with validation), evaluation and prediction."""

from __future__ import annotations

from torchloom.trainer.loops.evaluation import EvaluationLoop
from torchloom.trainer.loops.fit import FitLoop
from torchloom.trainer.loops.optimization import AutomaticOptimization, ManualOptimization
from torchloom.trainer.loops.prediction import PredictionLoop
from torchloom.trainer.loops.training_epoch import TrainingEpochLoop

__all__ = [
    "AutomaticOptimization",
    "EvaluationLoop",
    "FitLoop",
    "ManualOptimization",
    "PredictionLoop",
    "TrainingEpochLoop",
]
