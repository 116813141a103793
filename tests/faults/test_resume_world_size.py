"""A checkpoint saved mid-epoch resumes on another number of processes (2 -> 1, 1 -> 2) continuing the
epoch's global sample order: no sample of the epoch seen twice or skipped. The dataset's samples are their
own ids; the module writes the ids of every training batch, per rank, to a file.

Rank ``r`` of ``W`` ranks that began at position ``o`` of the epoch's order takes positions ``o + r``,
``o + r + W``, ...: the files give every position's id, which must be the global order's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, WeightedRandomSampler

from tests.processes import explain, run_python
from torchloom.core.data import prepare_dataloader, resumable_sampler
from torchloom.core.errors import ConfigurationError
from torchloom.core.samplers import DistributedSamplerWrapper, ResumableDistributedSampler
from torchloom.trainer import LoomModule, Trainer
from torchloom.trainer.callbacks import Callback

N, BATCH, ACCUMULATE = 45, 4, 2
JOB = Path(__file__).with_name("resume_world_size_job.py")


class Ids(Dataset[torch.Tensor]):
    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(float(index))


class IdStream(IterableDataset[torch.Tensor]):
    def __iter__(self) -> Any:
        return (torch.tensor(float(index)) for index in range(N))


class IdModel(LoomModule):
    """Appends ``{"batch_idx", "ids"}`` of each training batch to ``OUT/TAG-rank<R>.jsonl``."""

    def __init__(self, out: str = "", tag: str = "") -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.out, self.tag = out, tag

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        record = {"batch_idx": batch_idx, "ids": batch.long().tolist()}
        with open(Path(self.out) / f"{self.tag}-rank{self.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")
        loss: torch.Tensor = self.layer(batch.view(-1, 1) / N).pow(2).mean()
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SaveAt(Callback):
    """Saves a checkpoint when ``step`` optimizer steps are done (mid-epoch, on every rank)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path, self.saved = step, path, False

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.saved:
            trainer.save_checkpoint(self.path)
            self.saved = True


def fit_ids(
    out: Path, tag: str, devices: int, max_steps: int = -1, ckpt_path: Any = None, stream: bool = False
) -> Trainer:
    """One epoch over the ids (shuffled unless ``stream``), stopping and saving ``OUT/TAG.ckpt`` at ``max_steps``."""
    torch.manual_seed(0)
    model = IdModel(str(out), tag)
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=1,
        max_steps=max_steps, accumulate_grad_batches=ACCUMULATE, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[SaveAt(max_steps, out / f"{tag}.ckpt")] if max_steps > 0 else None,
    )  # fmt: skip
    data = DataLoader(IdStream(), batch_size=BATCH) if stream else DataLoader(Ids(), batch_size=BATCH, shuffle=True)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


def records(out: Path, tag: str, rank: int) -> list[dict[str, Any]]:
    path = out / f"{tag}-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def place(positions: dict[int, int], out: Path, tag: str, world_size: int, start: int) -> None:
    """Puts the ids a run of ``world_size`` ranks saw at their positions in the epoch's order."""
    for rank in range(world_size):
        ids = [i for record in records(out, tag, rank) for i in record["ids"]]
        for j, sample in enumerate(ids):
            position = start + rank + j * world_size
            assert position not in positions, f"position {position} taken twice"
            positions[position] = sample


def fit_loop_state(path: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(path, weights_only=True)["loops"]["fit"]
    return state


def seeded_order(epoch: int = 0) -> list[int]:
    """The documented order of a shuffled epoch on several processes: a permutation seeded with seed + epoch."""
    generator = torch.Generator()
    generator.manual_seed(0 + epoch)
    return torch.randperm(N, generator=generator).tolist()


def test_two_ranks_resume_on_one_continuing_the_global_order(tmp_path: Path) -> None:
    process = run_python(JOB, str(tmp_path), "first", "2", "-", timeout=120)
    assert process.returncode == 0, explain(process)
    saved = fit_loop_state(tmp_path / "first.ckpt")
    # 2 optimizer steps of 2 accumulated batches of 4, on 2 ranks
    assert (saved["batches_done"], saved["samples_done"], saved["world_size"]) == (4, 32, 2)
    trainer = fit_ids(tmp_path, "rest", devices=1, ckpt_path=tmp_path / "first.ckpt")
    assert [r["batch_idx"] for r in records(tmp_path, "rest", 0)] == [8, 9, 10, 11]  # in 1-process batches
    assert trainer.global_step == 2 + 2  # 13 samples left: 3 full batches and 1 of 1, two windows
    positions: dict[int, int] = {}
    place(positions, tmp_path, "first", world_size=2, start=0)
    place(positions, tmp_path, "rest", world_size=1, start=32)
    # one process pads nothing: every id once, in the order an uninterrupted 2-rank run uses
    assert sorted(positions) == list(range(N))
    assert [positions[p] for p in range(N)] == seeded_order()


def test_one_rank_resumes_on_two_continuing_the_global_order(tmp_path: Path) -> None:
    fit_ids(tmp_path, "whole", devices=1)  # uninterrupted: the order a one-process run draws
    order = [i for record in records(tmp_path, "whole", 0) for i in record["ids"]]
    assert sorted(order) == list(range(N))
    fit_ids(tmp_path, "first", devices=1, max_steps=3)
    assert fit_loop_state(tmp_path / "first.ckpt")["samples_done"] == 24
    process = run_python(JOB, str(tmp_path), "rest", "-1", str(tmp_path / "first.ckpt"), timeout=120)
    assert process.returncode == 0, explain(process)
    # 21 samples left on 2 ranks: 11 each, as batches 2, 3, 4 (24 // 8 = 3, down to a whole window)
    assert [[r["batch_idx"] for r in records(tmp_path, "rest", rank)] for rank in (0, 1)] == [[2, 3, 4]] * 2
    positions: dict[int, int] = {}
    place(positions, tmp_path, "first", world_size=1, start=0)
    place(positions, tmp_path, "rest", world_size=2, start=24)
    assert sorted(positions) == list(range(N + 1))
    assert [positions[p] for p in range(N)] == order  # the uninterrupted run's order, every id once
    assert positions[N] == order[0]  # DistributedSampler's padding: the order continues from its start


def test_same_world_size_resume_and_a_checkpoint_without_the_sample_count(tmp_path: Path) -> None:
    fit_ids(tmp_path, "whole", devices=1)
    order = [i for record in records(tmp_path, "whole", 0) for i in record["ids"]]
    fit_ids(tmp_path, "first", devices=1, max_steps=3)
    fit_ids(tmp_path, "rest", devices=1, ckpt_path=tmp_path / "first.ckpt")
    # written before the sample count existed: resumed as before, by reading and dropping 6 batches
    checkpoint = torch.load(tmp_path / "first.ckpt", weights_only=True)
    for key in ("samples_done", "world_size", "sample_order"):
        del checkpoint["loops"]["fit"][key]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="did not record the number of processes.*assuming it was 1"):
        fit_ids(tmp_path, "old", devices=1, ckpt_path=tmp_path / "old.ckpt")
    first = [i for record in records(tmp_path, "first", 0) for i in record["ids"]]
    for tag in ("rest", "old"):
        rest = records(tmp_path, tag, 0)
        assert rest[0]["batch_idx"] == 6 and first + [i for record in rest for i in record["ids"]] == order


def test_a_stream_resumes_on_the_same_world_size_and_is_refused_on_another(tmp_path: Path) -> None:
    fit_ids(tmp_path, "first", devices=1, max_steps=3, stream=True)
    saved = fit_loop_state(tmp_path / "first.ckpt")
    assert saved["samples_done"] is None and saved["world_size"] == 1
    fit_ids(tmp_path, "rest", devices=1, ckpt_path=tmp_path / "first.ckpt", stream=True)
    seen = [i for tag in ("first", "rest") for record in records(tmp_path, tag, 0) for i in record["ids"]]
    assert seen == list(range(N))
    # the same checkpoint, as 2 ranks would have written it, on 1 process: refused before any batch
    checkpoint = torch.load(tmp_path / "first.ckpt", weights_only=True)
    checkpoint["loops"]["fit"]["world_size"] = 2
    torch.save(checkpoint, tmp_path / "two.ckpt")
    with pytest.raises(
        ConfigurationError, match=r"on 2 process\(es\), and this run has 1.*IdStream.*Valid: resume on 2"
    ):
        fit_ids(tmp_path, "refused", devices=1, ckpt_path=tmp_path / "two.ckpt", stream=True)
    assert records(tmp_path, "refused", 0) == []


def shares(sampler_of: Any, world_size: int, start: int) -> list[list[int]]:
    samplers = [sampler_of(world_size, rank) for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_start(start)
    return [list(sampler) for sampler in samplers]


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(1, 30),
    before=st.integers(1, 4),
    after=st.integers(1, 4),
    batch=st.integers(1, 5),
    full_batches=st.integers(0, 8),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
)
def test_any_world_sizes_split_the_rest_of_the_order_once(
    size: int, before: int, after: int, batch: int, full_batches: int, shuffle: bool, drop_last: bool
) -> None:
    data: Any = list(range(size))  # a sized sequence of indices: all a sampler reads

    def sampler_of(world_size: int, rank: int) -> ResumableDistributedSampler:
        sampler = ResumableDistributedSampler(data, world_size, rank, shuffle=shuffle, seed=5, drop_last=drop_last)
        sampler.set_epoch(3)
        return sampler

    first = shares(sampler_of, before, 0)
    for rank, share in enumerate(first):  # at start 0: exactly torch's DistributedSampler
        reference: DistributedSampler[int] = DistributedSampler(
            data, before, rank, shuffle=shuffle, seed=5, drop_last=drop_last
        )
        reference.set_epoch(3)
        assert share == list(reference)
    done = min(full_batches, len(first[0]) // batch) * batch  # full batches trained on every rank
    start = done * before
    rest = shares(sampler_of, after, start)
    order = sampler_of(1, 0).global_order()
    seen: dict[int, int] = {}
    for world_size, offset, parts in ((before, 0, [s[:done] for s in first]), (after, start, rest)):
        for rank, share in enumerate(parts):
            for j, index in enumerate(share):
                seen[offset + rank + j * world_size] = index
    assert sorted(seen) == list(range(len(seen)))  # no position twice, none skipped
    assert all(index == order[position % size] for position, index in seen.items())  # past the end: padding
    left = size - start
    expected = left - left % after if drop_last else left + (-left) % after
    assert len(seen) - start == max(0, expected)


def test_a_custom_sampler_resumes_over_its_own_draw_and_orders_must_agree() -> None:
    weights = [float(i % 3 + 1) for i in range(20)]

    def sampler_of(world_size: int, rank: int) -> DistributedSamplerWrapper:
        draws = WeightedRandomSampler(weights, 20, generator=torch.Generator().manual_seed(1))
        return DistributedSamplerWrapper(draws, num_replicas=world_size, rank=rank)

    whole = list(sampler_of(1, 0))
    two = shares(sampler_of, 2, 0)
    assert [whole[r::2] for r in (0, 1)] == two  # ranks take turns over the sampler's draw
    rest = shares(sampler_of, 3, 8)
    assert [whole[8 + r :: 3] for r in range(3)] == rest  # 3 ranks share the draw's last 12 positions
    with pytest.raises(
        ConfigurationError, match=r"'drawn' order of another sampler.*draw of its WeightedRandomSampler"
    ):
        sampler_of(1, 0).set_start(8, "drawn")  # its draw is its order: it follows no other
    with pytest.raises(ConfigurationError, match=r"set_start\(-1\)"):
        sampler_of(1, 0).set_start(-1)


def test_the_loader_names_its_resumable_sampler_and_the_share_of_a_batch() -> None:
    split = {"num_replicas": 2, "rank": 1}
    by_batch = prepare_dataloader(DataLoader(Ids(), batch_size=BATCH, shuffle=True), split, 1)
    found = resumable_sampler(by_batch)
    assert found is not None and found[1] == BATCH and found[0].order == "seeded"
    kept = prepare_dataloader(DataLoader(Ids(), batch_size=BATCH, shuffle=True), split, 1, keep_draws=True)
    assert resumable_sampler(kept)[0].order == "drawn"  # type: ignore[index]
    unbatched = prepare_dataloader(DataLoader(Ids(), batch_size=None), split, 1)
    assert resumable_sampler(unbatched)[1] == 1  # type: ignore[index]
    assert resumable_sampler(DataLoader(IdStream(), batch_size=BATCH)) is None
    own = DataLoader(Ids(), batch_size=BATCH, sampler=DistributedSampler(Ids(), 2, 1))
    assert resumable_sampler(prepare_dataloader(own, split, 1)) is None  # the user's own: not re-split
    generator = torch.Generator().manual_seed(2)  # one process shuffles with it; no checkpoint holds its state
    drawn = DataLoader(Ids(), batch_size=BATCH, shuffle=True, generator=generator)
    assert resumable_sampler(prepare_dataloader(drawn, {"num_replicas": 1, "rank": 0}, 0, keep_draws=True)) is None
