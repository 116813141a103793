"""The hooks are called in the order docs/trainer/hooks.md documents: the test reads the doc's blocks,
expands them for the run it makes, and compares with the calls a recording module and callback saw."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from torchloom.trainer.callbacks import Callback, LambdaCallback
from torchloom.trainer.module import LoomModule

from .engine_models import Regressor, loader, quiet_trainer

pytestmark = pytest.mark.filterwarnings("ignore:The hyper-parameter 'recorder'")

DOC = Path(__file__).resolve().parents[2] / "docs" / "trainer" / "hooks.md"
CALLBACK_HOOKS = {
    name for name, value in vars(Callback).items() if callable(value) and name.startswith(("on_", "setup", "teardown"))
}
MODULE_ONLY = {
    *("configure_callbacks", "prepare_data", "configure_model", "configure_optimizers", "training_step"),
    *("validation_step", "test_step", "predict_step", "transfer_batch_to_device", "optimizer_step"),
    *("optimizer_zero_grad", "configure_gradient_clipping", "lr_scheduler_step"),
    *("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader"),
}
RECORDED_MODULE_HOOKS = sorted(
    {name for name in vars(LoomModule) if name.startswith("on_") or name in ("setup", "teardown")} | set(MODULE_ONLY)
)


def read_blocks() -> dict[str, list[str]]:
    """``## name`` sections of the doc -> the lines of their ``text`` code block."""
    blocks: dict[str, list[str]] = {}
    for match in re.finditer(r"^## (.+?)\n.*?```text\n(.*?)```", DOC.read_text(), flags=re.S | re.M):
        blocks[match.group(1).strip()] = match.group(2).rstrip("\n").split("\n")
    return blocks


Counts = Callable[[str, tuple[int, ...]], int]
Conditions = Callable[[str, tuple[int, ...]], bool]


def expand(block: str, blocks: dict[str, list[str]], counts: Counts, conditions: Conditions) -> list[tuple[str, str]]:
    """The ``(who, hook)`` calls the doc promises, loops unrolled and conditions evaluated."""
    calls: list[tuple[str, str]] = []

    def run(lines: list[str], indexes: tuple[int, ...]) -> None:
        position = 0
        while position < len(lines):
            line = lines[position]
            indent = len(line) - len(line.lstrip())
            body = []
            position += 1
            while position < len(lines) and len(lines[position]) - len(lines[position].lstrip()) > indent:
                body.append(
                    lines[position][indent + 4 :] if lines[position].startswith(" " * (indent + 4)) else lines[position]
                )
                position += 1
            text = line.strip()
            if text.startswith("for each "):
                name = text[len("for each ") : -1]
                for index in range(counts(name, indexes)):
                    run(body, (*indexes, index))
            elif text.startswith("if "):
                if conditions(text[3:-1], indexes):
                    run(body, indexes)
            elif text.startswith("include: "):
                run(blocks[text[len("include: ") :]], indexes)
            else:
                name, _, who = text.partition(" ")
                sides = {"(module)": ["module"], "(callbacks)": ["callback"], "": ["callback", "module"]}[who]
                for side in sides:
                    if side == "module" or name in CALLBACK_HOOKS:
                        calls.append((side, name))

    run(blocks[block], ())
    return calls


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []


class WithData(Regressor):
    def train_dataloader(self) -> Any:
        return loader(16, batch_size=4)

    def val_dataloader(self) -> Any:
        return loader(8, batch_size=4)

    def test_dataloader(self) -> Any:
        return loader(8, batch_size=4)

    def predict_dataloader(self) -> Any:
        return loader(8, batch_size=4)


class RecordingModule(WithData):
    """Every hook appends ("module", name) before doing what the base does."""

    def __init__(self, recorder: Recorder, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hparams.pop("recorder")
        self.__dict__["recorder"] = recorder

    @property
    def log_of_calls(self) -> list[tuple[str, str]]:
        recorder: Recorder = self.__dict__["recorder"]
        return recorder.calls


def _recording(name: str) -> Any:
    def hook(self: RecordingModule, *args: Any, **kwargs: Any) -> Any:
        self.log_of_calls.append(("module", name))
        return getattr(super(RecordingModule, self), name)(*args, **kwargs)

    return hook


for _name in RECORDED_MODULE_HOOKS:
    setattr(RecordingModule, _name, _recording(_name))


def recording_callback(recorder: Recorder) -> Callback:
    def record(name: str) -> Any:
        return lambda *args, **kwargs: recorder.calls.append(("callback", name))

    hooks = {name: record(name) for name in CALLBACK_HOOKS}
    hooks.pop("on_exception")
    return LambdaCallback(**hooks)


def two_batches_of(kind: str) -> Counts:
    return lambda name, indexes: 2 if name == kind else 0


def test_fit_validate_test_predict_call_the_hooks_in_the_documented_order() -> None:
    blocks = read_blocks()
    assert {"fit", "validation loop", "sanity check", "validate", "test", "predict"} <= blocks.keys()
    recorder = Recorder()
    model = RecordingModule(recorder, scheduler="step")
    trainer = quiet_trainer(
        max_epochs=2, limit_val_batches=2, num_sanity_val_steps=1, callbacks=[recording_callback(recorder)]
    )
    trainer.fit(model)
    batches = {"epoch": 2, "training batch": 4, "validation batch": 2, "sanity batch": 1}
    conditions: dict[str, Callable[[tuple[int, ...]], bool]] = {
        "the sanity check runs": lambda i: True,
        "the batch ends an accumulation window": lambda i: True,
        "the batch is inside an accumulation window": lambda i: False,
        "a step-interval scheduler is due": lambda i: False,
        "validation is due": lambda i: i[-1] == 3,
        "an epoch-interval scheduler is due": lambda i: True,
    }
    expected = expand("fit", blocks, lambda name, i: batches[name], lambda name, i: conditions[name](i))
    assert recorder.calls == expected

    for fn, kind in (("validate", "validation batch"), ("test", "test batch"), ("predict", "predict batch")):
        recorder.calls.clear()
        getattr(trainer, fn)(model, **({"verbose": False} if fn != "predict" else {}))
        assert recorder.calls == expand(fn, blocks, two_batches_of(kind), lambda name, i: True), fn


def test_accumulation_and_step_schedulers_follow_the_documented_order() -> None:
    blocks = read_blocks()
    recorder = Recorder()

    class StepScheduled(RecordingModule):
        def configure_optimizers(self) -> Any:
            self.log_of_calls.append(("module", "configure_optimizers"))
            optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    trainer = quiet_trainer(
        max_epochs=1, accumulate_grad_batches=3, limit_val_batches=0, callbacks=[recording_callback(recorder)]
    )
    trainer.fit(StepScheduled(recorder))

    def ends_window(i: tuple[int, ...]) -> bool:
        return i[-1] in (2, 3)  # 4 batches in windows of 3: the 3rd and the last one step

    conditions: dict[str, Callable[[tuple[int, ...]], bool]] = {
        "the sanity check runs": lambda i: False,
        "the batch ends an accumulation window": ends_window,
        "the batch is inside an accumulation window": lambda i: not ends_window(i),
        "a step-interval scheduler is due": ends_window,
        "validation is due": lambda i: False,
        "an epoch-interval scheduler is due": lambda i: False,
    }
    expected = expand(
        "fit", blocks, lambda name, i: {"epoch": 1, "training batch": 4}[name], lambda n, i: conditions[n](i)
    )
    assert recorder.calls == expected
    assert trainer.global_step == 2


def test_an_exception_reaches_on_exception_and_propagates() -> None:
    seen: list[BaseException] = []

    class Failing(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            raise RuntimeError("boom in training_step")

    trainer = quiet_trainer(max_epochs=1, callbacks=[LambdaCallback(on_exception=lambda t, m, e: seen.append(e))])
    with pytest.raises(RuntimeError, match="boom in training_step"):
        trainer.fit(Failing(), loader())
    assert len(seen) == 1 and "boom" in str(seen[0])


def test_the_base_no_op_hooks_really_do_nothing() -> None:
    """The Trainer skips the hooks in NO_OP_HOOKS unless overridden: each must be an empty body in the base."""
    import ast
    import inspect
    import textwrap

    from torchloom.trainer.module import NO_OP_HOOKS

    assert {"on_train_batch_start", "on_before_backward", "on_before_zero_grad", "configure_model"} <= NO_OP_HOOKS
    for name in NO_OP_HOOKS:
        function = ast.parse(textwrap.dedent(inspect.getsource(getattr(LoomModule, name)))).body[0]
        assert isinstance(function, ast.FunctionDef), name
        body = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        returns_none = [
            s for s in body if isinstance(s, ast.Return) and (s.value is None or ast.unparse(s.value) == "None")
        ]
        assert body == returns_none, f"LoomModule.{name} does something, so it must not be in NO_OP_HOOKS"


def test_overridden_hooks_run_and_may_log_and_base_no_ops_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    class Logging(Regressor):
        def on_before_zero_grad(self, optimizer: Any) -> None:
            calls.append("on_before_zero_grad")
            self.log("from_hook", 1.0)

    for name in ("on_train_batch_start", "on_after_backward"):  # base no-ops: a call would be recorded
        monkeypatch.setattr(LoomModule, name, lambda self, *a, _n=name: calls.append(_n), raising=True)
    from torchloom.trainer import hooks

    monkeypatch.setattr(hooks, "NO_OP_HOOKS", hooks.NO_OP_HOOKS | {"on_train_batch_start", "on_after_backward"})
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2)
    trainer.fit(Logging(), loader())
    assert calls == ["on_before_zero_grad", "on_before_zero_grad"]
    assert float(trainer.callback_metrics["from_hook"]) == 1.0
