"""Trainer callbacks: the :class:`Callback` base and the built-in ones."""

from torchloom.trainer.callbacks.callback import Callback
from torchloom.trainer.callbacks.checkpoint import ModelCheckpoint
from torchloom.trainer.callbacks.early_stopping import EarlyStopping
from torchloom.trainer.callbacks.lambda_callback import LambdaCallback
from torchloom.trainer.callbacks.lr_monitor import LearningRateMonitor
from torchloom.trainer.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from torchloom.trainer.callbacks.preemption import PreemptionCheckpoint
from torchloom.trainer.callbacks.progress import ProgressBar, RichProgressBar, TQDMProgressBar
from torchloom.trainer.callbacks.summary import ModelSummary
from torchloom.trainer.callbacks.timer import Timer

__all__ = [
    "Callback",
    "EarlyStopping",
    "LambdaCallback",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "ModelSummary",
    "NonFiniteError",
    "NonFiniteGuard",
    "PreemptionCheckpoint",
    "ProgressBar",
    "RichProgressBar",
    "TQDMProgressBar",
    "Timer",
]
