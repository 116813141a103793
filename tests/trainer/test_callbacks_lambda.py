"""LambdaCallback: keywords become hooks; unknown names are rejected with the valid ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from torchloom.core.errors import ConfigurationError
from torchloom.trainer.callbacks import Callback, LambdaCallback
from torchloom.trainer.callbacks.lambda_callback import HOOK_NAMES

from .test_callbacks_fakes import FakeTrainer


def test_every_hook_of_the_base_can_be_given() -> None:
    calls: list[tuple[str, tuple[Any, ...]]] = []
    hooks = {name: (lambda n: lambda *args: calls.append((n, args)))(name) for name in HOOK_NAMES}
    callback = LambdaCallback(**hooks)
    for name in HOOK_NAMES:
        getattr(callback, name)("trainer", "module", 1)
    assert [name for name, _ in calls] == list(HOOK_NAMES)
    assert calls[0][1] == ("trainer", "module", 1)
    assert {"on_fit_start", "on_train_batch_end", "on_save_checkpoint", "setup", "on_exception"} <= set(HOOK_NAMES)
    assert "state_dict" not in HOOK_NAMES and "load_state_dict" not in HOOK_NAMES


def test_given_hooks_run_in_a_fit_and_others_stay_no_ops(tmp_path: Path) -> None:
    seen: list[int] = []
    callback = LambdaCallback(on_train_epoch_end=lambda trainer, module: seen.append(trainer.current_epoch))
    FakeTrainer(tmp_path, [callback]).fit([1.0, 2.0, 3.0])
    assert seen == [0, 1, 2]
    assert isinstance(callback, Callback) and callback.state_dict() == {}


def test_unknown_names_and_values_that_are_not_callable() -> None:
    with pytest.raises(ConfigurationError, match=r"'on_epoch_end', which is not a callback hook.*'on_fit_start'"):
        LambdaCallback(on_epoch_end=lambda trainer, module: None)
    with pytest.raises(ConfigurationError, match="must be callable"):
        LambdaCallback(on_fit_start=3)  # type: ignore[arg-type]
