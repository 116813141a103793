"""``ckpt_path="last"`` never picks a checkpoint whose save was cut short."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch

from torchloom.core.checkpoint import deepspeed as deepspeed_io
from torchloom.core.checkpoint import distributed as sharded_io
from torchloom.trainer.checkpoint import _find_last


def _age(path: Path, seconds_ago: float) -> None:
    stamp = 1_700_000_000 - seconds_ago
    os.utime(path, (stamp, stamp))


def _trainer_with_checkpoints_in(folder: Path) -> SimpleNamespace:
    callback = SimpleNamespace(last_model_path="", dirpath=folder)
    return SimpleNamespace(checkpoint_callbacks=[callback])


def test_last_skips_directories_whose_save_did_not_finish(tmp_path: Path) -> None:
    complete = tmp_path / "last.ckpt"
    torch.save({"global_step": 1}, complete)
    _age(complete, 300)
    partial_sharded = tmp_path / "last-v1.ckpt"  # DCP's files but not torchloom's meta, which is written first...
    partial_sharded.mkdir()
    (partial_sharded / ".metadata").write_bytes(b"")  # ... so only a crash inside the swap could leave this
    _age(partial_sharded, 200)
    partial_deepspeed = tmp_path / "last-v2.ckpt"  # DeepSpeed's partitions, without torchloom's file written last
    (partial_deepspeed / deepspeed_io.TAG).mkdir(parents=True)
    (partial_deepspeed / "latest").write_text(deepspeed_io.TAG)
    _age(partial_deepspeed, 100)
    assert _find_last(_trainer_with_checkpoints_in(tmp_path)) == str(complete)  # type: ignore[arg-type]


def test_last_takes_the_newest_complete_checkpoint_file_or_directory(tmp_path: Path) -> None:
    older = tmp_path / "last.ckpt"
    torch.save({"global_step": 1}, older)
    _age(older, 300)
    newer = tmp_path / "last-v1.ckpt"
    (newer / deepspeed_io.TAG).mkdir(parents=True)
    (newer / "latest").write_text(deepspeed_io.TAG)
    deepspeed_io.write_extra(newer, {"state_dict": "module"}, {"global_step": 2})
    _age(newer, 100)
    assert deepspeed_io.is_deepspeed_checkpoint(newer) and not sharded_io.is_sharded_checkpoint(newer)
    assert _find_last(_trainer_with_checkpoints_in(tmp_path)) == str(newer)  # type: ignore[arg-type]


def test_last_finds_nothing_when_every_save_was_cut_short(tmp_path: Path) -> None:
    (tmp_path / "last.ckpt").mkdir()
    (tmp_path / ".last.ckpt.partial").mkdir()  # a staging folder is never a candidate
    assert _find_last(_trainer_with_checkpoints_in(tmp_path)) is None  # type: ignore[arg-type]
