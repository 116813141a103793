"""MetricStore: defaults per hook, step/epoch values, weighted means, sync_dist (also on a real 2-rank gloo group)."""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.multiprocessing.spawn import ProcessContext, start_processes

from torchloom.core.errors import ConfigurationError
from torchloom.trainer.logging import MetricStore, split_by_dataloader


def no_reduce(tensor: Tensor, op: str) -> Tensor:
    raise AssertionError("reduce must not run without sync_dist")


def floats(metrics: dict[str, Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------- defaults per hook
def test_training_step_logs_per_step_by_default() -> None:
    store = MetricStore(no_reduce)
    with store.hook("training_step", "train"):
        store.log("loss", 2.0)
    assert store.step_end() == {"loss": 2.0}
    assert store.epoch_end("train") == {}
    assert floats(store.callback_metrics) == {"loss": 2.0}


@pytest.mark.parametrize("hook", ["validation_step", "on_validation_batch_end", "test_step", "on_test_batch_start"])
def test_eval_steps_log_per_epoch_by_default(hook: str) -> None:
    store = MetricStore(no_reduce)
    stage = "test" if "test" in hook else "validate"
    for value in (1.0, 3.0):
        with store.hook(hook, stage):
            store.log("m", value)
        assert store.step_end() == {}
    assert store.epoch_end(stage) == {"m": 2.0}


@pytest.mark.parametrize(
    ("hook", "stage"),
    [("on_train_epoch_end", "train"), ("on_train_start", "train"), ("on_validation_epoch_end", "validate")],
)
def test_epoch_hooks_log_per_epoch_and_refuse_on_step(hook: str, stage: str) -> None:
    store = MetricStore(no_reduce)
    store.current_batch_size = 100  # a stale batch size does not weigh epoch-hook values
    with store.hook("training_step", "train"):
        store.log("m", 1.0, on_step=False, on_epoch=True, batch_size=1)
    with store.hook(hook, stage):
        store.log("m" if stage == "train" else "v", 3.0)
        with pytest.raises(ConfigurationError, match=f"on_step=True\\) is not possible in {hook}"):
            store.log("x", 1.0, on_step=True)
    expected = {"m": 2.0} if stage == "train" else {"v": 3.0}
    assert store.epoch_end(stage) == expected


def test_explicit_flags_override_the_defaults_and_fork_the_names() -> None:
    store = MetricStore(no_reduce)
    for value in (1.0, 3.0):
        with store.hook("training_step", "train"):
            store.log("loss", value, on_step=True, on_epoch=True, prog_bar=True)
        assert store.step_end() == {"loss_step": value}
        assert float(store.callback_metrics["loss"]) == value  # the latest value, step or epoch
    assert store.epoch_end("train") == {"loss_epoch": 2.0}
    assert floats(store.callback_metrics) == {"loss": 2.0, "loss_step": 3.0, "loss_epoch": 2.0}
    assert floats(store.progress_bar_metrics) == {"loss_step": 3.0, "loss_epoch": 2.0}
    assert floats(store.logged_metrics) == {"loss_step": 3.0, "loss_epoch": 2.0}
    with store.hook("validation_step", "validate"):
        store.log("acc", 0.5, on_step=True)
    assert store.step_end() == {"acc_step": 0.5}
    assert store.epoch_end("validate") == {"acc_epoch": 0.5}


def test_the_same_name_logged_another_way_is_recorded_that_way_and_new_names_stay_bounded() -> None:
    """The store remembers each way of logging a name; a change of flags is not answered from that memory."""
    from torchloom.trainer import logging as logging_module

    store = MetricStore(no_reduce)
    with store.hook("training_step", "train"):
        store.log("loss", 1.0, prog_bar=True)
    store.step_end()
    with store.hook("training_step", "train"):
        store.log("loss", 2.0, prog_bar=False, on_epoch=True)
    assert store.step_end() == {"loss_step": 2.0}
    with store.hook("training_step", "train"):
        for step in range(logging_module._MAX_METAS + 10):  # a name per step, as some users log
            store.log(f"loss_{step}", float(step))
    assert len(store._metas) <= logging_module._MAX_METAS
    assert store.step_end()[f"loss_{logging_module._MAX_METAS + 9}"] == logging_module._MAX_METAS + 9


def test_logger_and_prog_bar_flags_choose_the_dicts() -> None:
    store = MetricStore(no_reduce)
    with store.hook("training_step", "train"):
        store.log("hidden", 1.0, logger=False)
        store.log("shown", 2.0, prog_bar=True)
    assert store.step_end() == {"shown": 2.0}
    assert set(store.callback_metrics) == {"hidden", "shown"}
    assert set(store.progress_bar_metrics) == {"shown"} and set(store.logged_metrics) == {"shown"}


def test_step_end_without_loggers_publishes_for_callbacks_only() -> None:
    store = MetricStore(no_reduce)
    with store.hook("training_step", "train"):
        store.log("loss", torch.tensor(4.0))
    assert store.step_end(for_loggers=False) == {}
    assert floats(store.callback_metrics) == {"loss": 4.0} and store.logged_metrics == {}
    assert store.step_end() == {}  # the values of a step are published once


def test_step_values_reach_callback_metrics_when_logged_and_synced_ones_at_step_end() -> None:
    store = MetricStore(FakeWorld(other=1.0))
    with store.hook("training_step", "train"):
        store.log("loss", 3.0, prog_bar=True, on_epoch=True)
        store.log("synced", 3.0, sync_dist=True)
    # on_train_batch_end callbacks run before step_end and see this step's value already
    assert floats(store.callback_metrics) == {"loss": 3.0, "loss_step": 3.0}
    assert floats(store.progress_bar_metrics) == {"loss_step": 3.0} and store.logged_metrics == {}
    assert store.step_end() == {"loss_step": 3.0, "synced": 2.0}
    assert float(store.callback_metrics["synced"]) == 2.0


# ---------------------------------------------------------------------------------------------- epoch reductions
def test_epoch_mean_is_weighted_by_batch_size() -> None:
    store = MetricStore(no_reduce)
    for value, size in [(1.0, 1), (3.0, 3)]:
        store.current_batch_size = size
        with store.hook("validation_step", "validate"):
            store.log("loss", value)
            store.log("explicit", value, batch_size=4 - size)  # an explicit batch_size wins
    assert store.epoch_end("validate") == {"loss": 2.5, "explicit": 1.5}
    store.current_batch_size = None
    with store.hook("validation_step", "validate"):
        store.log("unweighted", 1.0)
        store.log("unweighted", 2.0)
    assert store.epoch_end("validate") == {"unweighted": 1.5}


@pytest.mark.parametrize(
    ("reduce_fx", "expected"), [("sum", 9.0), ("max", 5.0), ("min", 1.0), (torch.max, 5.0), ("MEAN", 3.0)]
)
def test_epoch_reductions(reduce_fx: Any, expected: float) -> None:
    store = MetricStore(no_reduce)
    for value in (1.0, 5.0, 3.0):
        store.current_batch_size = 7
        with store.hook("test_step", "test"):
            store.log("m", value, reduce_fx=reduce_fx)
    assert store.epoch_end("test") == {"m": expected}


def test_stages_accumulate_separately_and_epoch_end_starts_afresh() -> None:
    store = MetricStore(no_reduce)
    with store.hook("training_step", "train"):
        store.log("m", 1.0, on_epoch=True)
    with store.hook("validation_step", "validate"):
        store.log("m", 10.0)
    assert store.epoch_end("validate") == {"m": 10.0}
    with store.hook("training_step", "train"):
        store.log("m", 3.0, on_epoch=True)
    assert store.epoch_end("train") == {"m_epoch": 2.0}
    assert store.epoch_end("train") == {}
    assert floats(store.last_epoch_metrics("train")) == {} and store.last_epoch_metrics("nothing") == {}


def test_epoch_end_before_and_after_the_epoch_end_hooks() -> None:
    """The engine reduces the training epoch before on_train_epoch_end (so callbacks see it), then again."""
    store = MetricStore(no_reduce)
    for value in (1.0, 3.0):
        with store.hook("training_step", "train"):
            store.log("loss", value, on_epoch=True)
    assert store.epoch_end("train") == {"loss_epoch": 2.0}
    assert float(store.callback_metrics["loss_epoch"]) == 2.0  # what on_train_epoch_end callbacks read
    with store.hook("on_train_epoch_end", "train"):
        store.log("summary", 7.0)
    assert store.epoch_end("train") == {"summary": 7.0}
    assert floats(store.callback_metrics) == {"loss": 2.0, "loss_step": 3.0, "loss_epoch": 2.0, "summary": 7.0}


def test_last_epoch_metrics_keep_every_value_of_the_stage() -> None:
    store = MetricStore(no_reduce)
    with store.hook("test_step", "test"):
        store.log("a", 1.0, logger=False)
        store.log("b", 2.0, on_step=True)
    store.step_end()
    store.epoch_end("test")
    assert floats(store.last_epoch_metrics("test")) == {"a": 1.0, "b_epoch": 2.0}


def test_sanity_check_values_are_checked_then_dropped() -> None:
    store = MetricStore(no_reduce)
    with store.hook("validation_step", "sanity_check"):
        store.log("val_loss", 1.0)
        with pytest.raises(ConfigurationError, match="reduce_fx='median'"):
            store.log("val_loss", 1.0, reduce_fx="median")
    assert store.epoch_end("sanity_check") == {} and store.step_end() == {} and store.callback_metrics == {}


def test_several_dataloaders_suffix_names_and_split_results() -> None:
    store = MetricStore(no_reduce)
    for idx in (0, 1):
        with store.hook("validation_step", "validate", dataloader_idx=idx):
            store.log("loss", float(idx), on_step=True)
    with store.hook("on_validation_epoch_end", "validate"):
        store.log("shared", 5.0)
    assert store.step_end() == {"loss_step/dataloader_idx_0": 0.0, "loss_step/dataloader_idx_1": 1.0}
    results = store.epoch_end("validate")
    assert results == {"loss_epoch/dataloader_idx_0": 0.0, "loss_epoch/dataloader_idx_1": 1.0, "shared": 5.0}
    assert float(store.callback_metrics["loss/dataloader_idx_1"]) == 1.0
    assert split_by_dataloader(results, 2) == [
        {"shared": 5.0, "loss_epoch/dataloader_idx_0": 0.0},
        {"shared": 5.0, "loss_epoch/dataloader_idx_1": 1.0},
    ]


def test_reset_one_stage_or_everything() -> None:
    store = MetricStore(no_reduce)
    with store.hook("training_step", "train"):
        store.log("t", 1.0, on_epoch=True)
    with store.hook("validation_step", "validate"):
        store.log("v", 1.0)
    store.reset("validate")
    assert store.step_end() == {}  # pending step values go too
    assert store.epoch_end("validate") == {} and store.epoch_end("train") == {"t_epoch": 1.0}
    store.reset()
    assert store.callback_metrics == {} and store.logged_metrics == {} and store.last_epoch_metrics("train") == {}


# ---------------------------------------------------------------------------------------------- values
def test_values_become_detached_float_scalars() -> None:
    store = MetricStore(no_reduce)
    weight = torch.ones(1, requires_grad=True)
    values: dict[str, Any] = {
        "int": 3,
        "bool": True,
        "np": np.float32(1.5),
        "long": torch.tensor([2]),
        "bf16": torch.tensor(0.5, dtype=torch.bfloat16),
        "f64": torch.tensor(0.25, dtype=torch.float64),
        "graph": (weight * 2).sum(),
    }
    with store.hook("training_step", "train"):
        for name, value in values.items():
            store.log(name, value)
    store.step_end()
    metrics = store.callback_metrics
    assert floats(metrics) == {"int": 3.0, "bool": 1.0, "np": 1.5, "long": 2.0, "bf16": 0.5, "f64": 0.25, "graph": 2.0}
    assert all(v.shape == () and not v.requires_grad for v in metrics.values())
    assert metrics["long"].dtype == torch.float32 and metrics["bf16"].dtype == torch.float32
    assert metrics["f64"].dtype == torch.float64


def test_bad_values_and_arguments_are_named() -> None:
    store = MetricStore(no_reduce)
    with store.hook("training_step", "train"):
        with pytest.raises(ConfigurationError, match=r"self.log\('v', ...\) got a tensor of shape \(2,\)"):
            store.log("v", torch.ones(2))
        with pytest.raises(ConfigurationError, match=r"self.log\('s', ...\) got 'text' of type str"):
            store.log("s", "text")
        with pytest.raises(
            ConfigurationError, match=r"reduce_fx='median' is not supported. Valid: 'mean', 'sum', 'max', 'min'"
        ):
            store.log("m", 1.0, reduce_fx="median")
        with pytest.raises(ConfigurationError, match=r"reduce_fx=.*not supported"):
            store.log("m", 1.0, reduce_fx=torch.median)
        with pytest.raises(ConfigurationError, match="on_step=False, on_epoch=False\\) records nothing"):
            store.log("m", 1.0, on_step=False, on_epoch=False)
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ConfigurationError, match=f"batch_size={bad!r}"):
                store.log("m", 1.0, batch_size=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="non-empty string name"):
            store.log("", 1.0)
        store.log("fx", 1.0, on_epoch=True, reduce_fx="sum")
        with pytest.raises(ConfigurationError, match="reduce_fx='sum' earlier in this epoch and now with 'max'"):
            store.log("fx", 1.0, on_epoch=True, reduce_fx="max")


def test_logging_outside_allowed_hooks_is_a_clear_error() -> None:
    store = MetricStore(no_reduce)
    with pytest.raises(ConfigurationError, match="outside a Trainer hook"):
        store.log("m", 1.0)
    for hook, stage in [
        ("setup", "train"),
        ("on_fit_end", "train"),
        ("on_train_end", "train"),
        ("predict_step", "predict"),
    ]:
        with (
            store.hook(hook, stage),
            pytest.raises(ConfigurationError, match=f"not supported in {hook}.*training_step"),
        ):
            store.log("m", 1.0)
    with (
        pytest.raises(ConfigurationError, match=r"stage='fitting' is not valid\. Valid: 'train', 'validate'"),
        store.hook("training_step", "fitting"),
    ):
        pass
    disabled = MetricStore(no_reduce, enabled=False)
    with disabled.hook("training_step", "train"), pytest.raises(ConfigurationError, match="barebones=True"):
        disabled.log("m", 1.0)


def test_hooks_nest_and_restore_the_outer_one() -> None:
    store = MetricStore(no_reduce)
    with store.hook("on_train_epoch_end", "train"):
        with store.hook("training_step", "train"):
            store.log("inner", 1.0)
        with pytest.raises(ConfigurationError, match="on_step=True"):
            store.log("outer", 1.0, on_step=True)
    with pytest.raises(ConfigurationError, match="outside"):
        store.log("after", 1.0)


# ---------------------------------------------------------------------------------------------- sync_dist
class FakeWorld:
    """A reduce function for one process that stands for a 2-rank world whose other rank logged ``other``."""

    def __init__(self, other: float) -> None:
        self.other = other
        self.calls: list[tuple[str, tuple[int, ...], torch.dtype]] = []

    def __call__(self, tensor: Tensor, op: str) -> Tensor:
        self.calls.append((op, tuple(tensor.shape), tensor.dtype))
        peer = torch.full_like(tensor, self.other)
        both = torch.stack([tensor, peer])
        return {"sum": both.sum(0), "mean": both.mean(0), "max": both.amax(0), "min": both.amin(0)}[op]


def test_sync_dist_batches_collectives_by_op_and_dtype() -> None:
    world = FakeWorld(other=1.0)
    store = MetricStore(world)
    with store.hook("training_step", "train"):
        store.log("a", 3.0, sync_dist=True)
        store.log("b", 5.0, sync_dist=True)
        store.log("c", 5.0, sync_dist=True, reduce_fx="max")
        store.log("d", torch.tensor(7.0, dtype=torch.float64), sync_dist=True)
        store.log("local", 9.0)
    assert store.step_end() == {"a": 2.0, "b": 3.0, "c": 5.0, "d": 4.0, "local": 9.0}
    assert sorted(world.calls) == sorted(
        [("mean", (2,), torch.float32), ("max", (1,), torch.float32), ("mean", (1,), torch.float64)]
    )
    world.calls.clear()
    with store.hook("validation_step", "validate"):
        store.log("loss", 3.0, sync_dist=True, batch_size=2)  # the fake peer sends 1.0 for weighted sum and weight
        store.log("total", 3.0, sync_dist=True, reduce_fx="sum")
    assert store.epoch_end("validate") == {"loss": pytest.approx((3.0 * 2 + 1.0) / (2 + 1)), "total": 4.0}
    assert world.calls == [("sum", (3,), torch.float32)]  # weighted sum, weight and the sum in one collective


def _rank_checks(rank: int, port: int, out_dir: str) -> None:
    from torchloom.core import distributed

    distributed.init_process_group(
        "gloo",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
        main_address="127.0.0.1",
        main_port=port,
    )
    try:
        calls: list[str] = []

        def reduce(tensor: Tensor, op: str) -> Tensor:  # what StrategyAdapter.reduce does: the strategy's all_reduce
            calls.append(op)
            result: Tensor = distributed.all_reduce(tensor, reduce_op=op)
            return result

        store = MetricStore(reduce)
        # epoch: rank 0 sees batches of 2 and 2 with losses 1 and 3, rank 1 one batch of 4 with loss 5
        batches = [(1.0, 2), (3.0, 2)] if rank == 0 else [(5.0, 4)]
        for loss, size in batches:
            store.current_batch_size = size
            with store.hook("validation_step", "validate"):
                store.log("loss", loss, sync_dist=True)
                store.log("local", loss)
                store.log("count", 1, reduce_fx="sum", sync_dist=True)
                store.log("worst", loss, reduce_fx="max", sync_dist=True)
                store.log("best", loss, reduce_fx="min", sync_dist=True)
        with store.hook("on_validation_epoch_end", "validate"):
            store.log("rank_sum", float(rank + 1), reduce_fx="sum", sync_dist=True)
        epoch = store.epoch_end("validate")
        # step: each rank logs its own value; mean and max across ranks
        with store.hook("training_step", "train"):
            store.log("step_mean", torch.tensor(float(2 * rank + 1)), sync_dist=True)
            store.log("step_max", float(rank), reduce_fx="max", sync_dist=True)
            store.log("step_local", float(rank))
        step = store.step_end()
        expected_epoch = {
            "loss": 3.5,
            "local": 2.0 if rank == 0 else 5.0,
            "count": 3.0,
            "worst": 5.0,
            "best": 1.0,
            "rank_sum": 3.0,
        }
        assert epoch == expected_epoch, epoch
        assert step == {"step_mean": 2.0, "step_max": 1.0, "step_local": float(rank)}, step
        assert sorted(calls) == ["max", "max", "mean", "min", "sum"], calls  # one collective per op group
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"epoch": epoch, "step": step}))
    finally:
        distributed.destroy_process_group()


@pytest.mark.slow
def test_sync_dist_on_a_real_two_rank_gloo_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchloom.core.environments.local import find_free_port

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    context: ProcessContext = start_processes(  # type: ignore[no-untyped-call]
        _rank_checks, args=(find_free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the 2-rank logging job did not finish in 120 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["epoch"]["loss"] == results[1]["epoch"]["loss"] == 3.5
    assert [r["epoch"]["local"] for r in results] == [2.0, 5.0]
    assert os.environ["OMP_NUM_THREADS"] == "1"
