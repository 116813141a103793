"""ModelCheckpoint: which files exist after a sequence of scores, when it saves, names, state and resume."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from torchloom.core.errors import ConfigurationError
from torchloom.trainer.callbacks import ModelCheckpoint
from torchloom.trainer.callbacks.checkpoint import format_template

from .test_callbacks_fakes import FakeTrainer, ckpt_names


def fit(tmp_path: Path, callback: ModelCheckpoint, scores: list[float | None], **kwargs: object) -> FakeTrainer:
    trainer = FakeTrainer(tmp_path, [callback])
    trainer.fit(scores, **kwargs)  # type: ignore[arg-type]
    return trainer


def test_top_k_min_keeps_the_k_lowest_and_removes_the_rest(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2, filename="{epoch}")
    fit(tmp_path, ckpt, [5.0, 3.0, 4.0, 1.0, 2.0])
    assert ckpt_names(tmp_path) == {"epoch=3.ckpt", "epoch=4.ckpt"}
    assert ckpt.best_model_path == str(tmp_path / "epoch=3.ckpt")
    assert ckpt.best_model_score == pytest.approx(1.0)
    assert ckpt.kth_best_model_path == str(tmp_path / "epoch=4.ckpt") and float(ckpt.kth_value) == pytest.approx(2.0)
    assert {Path(p).name: float(s) for p, s in ckpt.best_k_models.items()} == {"epoch=3.ckpt": 1.0, "epoch=4.ckpt": 2.0}
    assert ckpt.current_score == pytest.approx(2.0)


def test_top_k_max_and_nan_never_ranks(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="acc", mode="max", save_top_k=2, filename="{epoch}")
    fit(tmp_path, ckpt, [0.5, math.nan, 0.7, 0.6, 0.1], metric="acc")
    assert ckpt_names(tmp_path) == {"epoch=2.ckpt", "epoch=3.ckpt"}
    assert ckpt.best_model_score == pytest.approx(0.7)


def test_checkpoint_files_hold_the_ranking_that_includes_themselves(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2, filename="{epoch}")
    fit(tmp_path, ckpt, [2.0, 1.0])
    state = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)["callbacks"][ckpt.state_key]
    assert state["best_model_path"] == str(tmp_path / "epoch=1.ckpt")
    assert set(state["best_k_models"]) == {str(tmp_path / "epoch=0.ckpt"), str(tmp_path / "epoch=1.ckpt")}


def test_save_top_k_all_none_and_save_last(tmp_path: Path) -> None:
    every = ModelCheckpoint(dirpath=tmp_path / "all", monitor="val_loss", save_top_k=-1, filename="{epoch}")
    fit(tmp_path, every, [3.0, 2.0, 4.0])
    assert ckpt_names(tmp_path / "all") == {"epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt"}
    assert every.best_model_path.endswith("epoch=1.ckpt")

    last_only = ModelCheckpoint(dirpath=tmp_path / "last", monitor="val_loss", save_top_k=0, save_last=True)
    trainer = fit(tmp_path, last_only, [3.0, 2.0, 4.0])
    assert ckpt_names(tmp_path / "last") == {"last.ckpt"}
    assert last_only.last_model_path == str(tmp_path / "last" / "last.ckpt")
    assert torch.load(tmp_path / "last" / "last.ckpt", weights_only=True)["epoch"] == 2
    assert [p for p, _ in trainer.saved] == [last_only.last_model_path] * 3
    assert not list((tmp_path / "last").glob(".*.tmp"))  # atomic writes leave no temp files


def test_without_monitor_top_1_keeps_the_latest_and_top_all_keeps_every_file(tmp_path: Path) -> None:
    latest = ModelCheckpoint(dirpath=tmp_path / "one", save_last=True)
    fit(tmp_path, latest, [None, None, None])
    assert ckpt_names(tmp_path / "one") == {"epoch=2-step=6.ckpt", "last.ckpt"}
    assert latest.best_model_path.endswith("epoch=2-step=6.ckpt") and latest.best_model_score is None

    every = ModelCheckpoint(dirpath=tmp_path / "all", save_top_k=-1)
    fit(tmp_path, every, [None, None])
    assert ckpt_names(tmp_path / "all") == {"epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"}


def test_every_n_train_steps_saves_mid_epoch_and_not_at_validation(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=3)
    trainer = fit(tmp_path, ckpt, [None, None, None], steps_per_epoch=4)
    assert ckpt_names(tmp_path) == {
        "epoch=0-step=3.ckpt",
        "epoch=1-step=6.ckpt",
        "epoch=2-step=9.ckpt",
        "epoch=2-step=12.ckpt",
    }
    assert len(trainer.saved) == 4


def test_every_n_epochs(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=2, filename="{epoch}")
    fit(tmp_path, ckpt, [None] * 5)
    assert ckpt_names(tmp_path) == {"epoch=1.ckpt", "epoch=3.ckpt"}


def test_without_validation_saves_at_train_epoch_end(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="train_loss", filename="{epoch}-{train_loss:.1f}")
    trainer = FakeTrainer(tmp_path, [ckpt], num_val_batches=[])
    trainer.fit([2.0, 1.0, 3.0], metric="train_loss")
    assert ckpt_names(tmp_path) == {"epoch=1-train_loss=1.0.ckpt"}


def test_no_saves_in_sanity_check_or_outside_fit(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")
    trainer = FakeTrainer(tmp_path, [ckpt])
    trainer.call("setup", "fit")
    trainer.global_step = 5
    trainer.sanity_checking = True
    trainer.validate_once(1.0)
    trainer.sanity_checking = False
    trainer.state.fn = "validate"
    trainer.validate_once(1.0)
    assert trainer.saved == []
    trainer.state.fn = "fit"
    trainer.validate_once(1.0)
    trainer.validate_once(0.5)  # same global step: already saved at this step
    assert len(trainer.saved) == 1
    trainer.global_step, trainer.fast_dev_run = 6, 1
    trainer.validate_once(0.1)
    assert len(trainer.saved) == 1


def test_filename_templates() -> None:
    metrics = {"epoch": 3, "step": 40, "val_loss": torch.tensor(0.1234), "val/acc": torch.tensor(0.9)}
    assert format_template("{epoch}-{step}", metrics) == "epoch=3-step=40"
    assert format_template("{epoch:02d}-{val_loss:.2f}", metrics) == "epoch=03-val_loss=0.12"
    assert format_template("e{epoch}_{val_loss:.3f}", metrics, insert_names=False) == "e3_0.123"
    assert format_template("{val/acc:.1f}", metrics) == "val/acc=0.9"
    with pytest.raises(ConfigurationError, match=r"'val_acc', which was not logged.*'epoch', 'step', 'val/acc'"):
        format_template("{val_acc}", metrics)
    ckpt = ModelCheckpoint(dirpath="/ckpts", filename="{epoch}")
    assert ckpt.format_checkpoint_name({"epoch": 1}) == os.path.join("/ckpts", "epoch=1.ckpt")
    assert ckpt.format_checkpoint_name({"epoch": 1}, version=2) == os.path.join("/ckpts", "epoch=1-v2.ckpt")


def test_colliding_names_get_a_version_suffix(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_train_steps=1)
    fit(tmp_path, ckpt, [None], steps_per_epoch=3)
    assert ckpt_names(tmp_path) == {"epoch=0.ckpt", "epoch=0-v1.ckpt", "epoch=0-v2.ckpt"}


def test_default_dirpath_is_under_the_log_dir_or_the_root_dir(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint()
    trainer = FakeTrainer(tmp_path, [ckpt])
    trainer.call("setup", "fit")
    assert ckpt.dirpath == os.path.join(str(tmp_path), "checkpoints")
    ckpt = ModelCheckpoint()
    trainer = FakeTrainer(tmp_path, [ckpt])
    trainer.log_dir = str(tmp_path / "logs" / "version_3")
    trainer.fit([None])
    assert ckpt_names(tmp_path / "logs" / "version_3" / "checkpoints") == {"epoch=0-step=2.ckpt"}


def test_monitor_never_logged_is_an_error_naming_the_logged_keys(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_los")
    with pytest.raises(ConfigurationError, match=r"monitor='val_los'.*'epoch', 'step', 'val_loss'"):
        fit(tmp_path, ckpt, [1.0])
    no_val = ModelCheckpoint(dirpath=tmp_path, monitor="val_los")
    with pytest.raises(ConfigurationError, match="val_los"):
        FakeTrainer(tmp_path, [no_val], num_val_batches=[]).fit([1.0])


def test_step_checks_before_the_first_validation_warn_then_fail_once_validation_ran(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", every_n_train_steps=1)
    trainer = FakeTrainer(tmp_path, [ckpt])
    trainer.call("setup", "fit")
    trainer.global_step = 1
    with pytest.warns(UserWarning, match="no metric named 'val_loss'"):
        trainer.call("on_train_batch_end", None, None, 0)
    assert trainer.saved == []
    trainer.validate_once(None)  # validation ran and still did not log it
    trainer.global_step = 2
    with pytest.raises(ConfigurationError, match="val_loss"):
        trainer.call("on_train_batch_end", None, None, 0)


def test_resume_continues_the_ranking(tmp_path: Path) -> None:
    first = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2, filename="{epoch}")
    trainer = fit(tmp_path, first, [3.0, 1.0, 2.0])
    assert ckpt_names(tmp_path) == {"epoch=1.ckpt", "epoch=2.ckpt"}
    saved = torch.load(tmp_path / "epoch=2.ckpt", weights_only=True)

    resumed = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=2, filename="{epoch}")
    assert resumed.state_key == first.state_key
    resumed.load_state_dict(saved["callbacks"][resumed.state_key])
    again = FakeTrainer(tmp_path, [resumed])
    again.current_epoch, again.global_step = 3, trainer.global_step
    again.fit([2.5, 1.5])  # 2.5 is worse than both kept files; 1.5 replaces epoch 2 (2.0)
    assert ckpt_names(tmp_path) == {"epoch=1.ckpt", "epoch=4.ckpt"}
    assert resumed.best_model_path == str(tmp_path / "epoch=1.ckpt")


def test_state_loaded_before_setup_waits_for_the_dirpath_and_a_moved_dirpath_restarts_the_ranking(
    tmp_path: Path,
) -> None:
    first = ModelCheckpoint(monitor="val_loss", save_top_k=2)
    fit(tmp_path, first, [1.0])
    resumed = ModelCheckpoint(monitor="val_loss", save_top_k=2)
    resumed.load_state_dict(first.state_dict())  # dirpath not resolved yet
    FakeTrainer(tmp_path, [resumed]).call("setup", "fit")
    assert resumed.best_k_models == first.best_k_models

    moved = ModelCheckpoint(dirpath=tmp_path / "elsewhere", monitor="val_loss", save_top_k=2)
    with pytest.warns(UserWarning, match="ranking starts afresh"):
        moved.load_state_dict(first.state_dict())
    assert moved.best_k_models == {} and moved.best_model_path == first.best_model_path


def test_weights_only_saves_and_state_keys(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)
    trainer = fit(tmp_path, ckpt, [None])
    assert trainer.saved == [(str(tmp_path / "epoch=0-step=2.ckpt"), True)]
    keys = {
        ModelCheckpoint(monitor="a").state_key,
        ModelCheckpoint(monitor="b").state_key,
        ModelCheckpoint(monitor="a", mode="max").state_key,
        ModelCheckpoint(monitor="a", every_n_train_steps=5).state_key,
    }
    assert len(keys) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "lowest"}, r"mode='lowest'.*'min', 'max'"),
        ({"save_top_k": -2}, "save_top_k=-2"),
        ({"save_top_k": 3}, "ranking needs a metric"),
        ({"every_n_train_steps": 2, "every_n_epochs": 1}, "mutually exclusive"),
        ({"every_n_epochs": -1}, "every_n_epochs=-1"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        ModelCheckpoint(**kwargs)  # type: ignore[arg-type]


def test_dirpath_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigurationError, match="is a file"):
        ModelCheckpoint(dirpath=tmp_path / "f")


@pytest.mark.filterwarnings("error::UserWarning")
def test_a_folder_with_files_warns_unless_the_fit_resumes(tmp_path: Path) -> None:
    (tmp_path / "old.ckpt").write_text("x")
    fresh = ModelCheckpoint(dirpath=tmp_path)
    with pytest.warns(UserWarning, match="is not empty"):
        fit(tmp_path, fresh, [None])
    resumed = ModelCheckpoint(dirpath=tmp_path)
    trainer = FakeTrainer(tmp_path, [resumed])
    trainer.call("setup", "fit")
    resumed.load_state_dict(fresh.state_dict())  # the trainer restores callbacks after setup
    trainer.global_step = 5
    trainer.validate_once(None)  # would fail on the warning filter below if it warned
    assert trainer.saved
