"""The Trainer with ``ModelParallelStrategy()`` on two real gloo ranks: the module parallelizes itself.

There is no ``parallelize_fn``: ``configure_model`` builds the layers (on the meta device) and splits
them over ``self.device_mesh``, which the strategy has built by then. One job
(``python test_sharded_model_parallel.py FOLDER``, re-run as two workers by the ``popen`` launcher):

1. 2-way tensor parallel (mesh ``1 x 2``): both ranks see every batch (only data-parallel ranks split
   the data); two epochs with norm clipping equal a plain single-process loop, with the global norm;
   the sharded checkpoint folder loads in this process with ``load_from_checkpoint``;
2. ``fully_shard`` over the data-parallel dimension (mesh ``2 x 1``) equals the plain loop on the
   whole batches of both ranks;
3. a ``configure_model`` that does not parallelize is refused with the error naming ``parallelize_fn``.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

if __name__ == "__main__":  # run as a script: the repository root, for `tests`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.processes import explain, run_python
from torchloom.core.errors import ConfigurationError
from torchloom.core.strategies.model_parallel import ModelParallelStrategy
from torchloom.trainer import LoomModule, Trainer
from torchloom.trainer.callbacks import Callback, ModelCheckpoint

pytestmark = pytest.mark.slow

TIMEOUT = datetime.timedelta(seconds=60)
CLIP = 1.0
QUIET: dict[str, Any] = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False}


def loader(batch_size: int) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator)
    return DataLoader(TensorDataset(x, 3 * x.sum(dim=1, keepdim=True)), batch_size=batch_size)


def build_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))


class MLP(LoomModule):
    """``split``: ``"tensor"`` (colwise then rowwise linear), ``"fsdp"`` (``fully_shard``) or ``"none"``."""

    def __init__(self, split: str = "tensor") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.mlp: nn.Sequential | None = None
        self.report: dict[str, Any] = {}
        self.clip_norms: list[float] = []

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        if self.mlp is not None:
            return
        self.mlp = build_mlp()
        mesh = self.device_mesh
        if mesh is None:  # outside a run (load_from_checkpoint): the plain model
            return
        self.report["built_on_meta"] = all(p.is_meta for p in self.mlp.parameters())
        self.report["mesh"] = [list(mesh.shape), list(mesh.mesh_dim_names or ())]
        if self.hparams["split"] == "tensor":
            parallelize_module(self.mlp, mesh["tensor_parallel"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        elif self.hparams["split"] == "fsdp":
            fully_shard(self.mlp, mesh=mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        assert self.mlp is not None
        loss = nn.functional.mse_loss(self.mlp(batch[0]), batch[1])
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        norm = self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if norm is not None:
            self.clip_norms.append(float(norm))


def full_weights(module: nn.Module) -> dict[str, Tensor]:
    """Whole weights on every rank (a collective for DTensors: every rank calls it, in the same order)."""
    weights = {}
    for key, value in module.state_dict().items():
        gather = getattr(value, "full_tensor", None)
        weights[key] = (gather() if callable(gather) else value).detach().clone()
    return weights


# ---------------------------------------------------------------------- the workers
class ParityCheck(Callback):
    """Trains the initial weights with a plain loop over the global batches and compares."""

    def __init__(self, global_batch: int) -> None:
        self.global_batch = global_batch

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        self.initial = full_weights(module)
        module.report["shards"] = {n: [list(p.to_local().shape), list(p.shape)] for n, p in module.named_parameters()}

    def on_fit_end(self, trainer: Any, module: Any) -> None:
        reference = build_mlp()
        reference.load_state_dict({key.removeprefix("mlp."): value for key, value in self.initial.items()})
        optimizer = torch.optim.SGD(reference.parameters(), lr=0.02, momentum=0.9)
        norms = []
        for _ in range(trainer.current_epoch):
            for x, y in loader(self.global_batch):
                nn.functional.mse_loss(reference(x), y).backward()  # type: ignore[no-untyped-call]
                norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)))
                optimizer.step()
                optimizer.zero_grad()
        trained = full_weights(module)
        module.report["max_weight_difference"] = max(
            (trained["mlp." + key] - value).abs().max().item() for key, value in reference.state_dict().items()
        )
        module.report.update(norms=module.clip_norms, reference_norms=norms, batches=trainer.num_training_batches)
        module.report["global_step"] = trainer.global_step


def fit(folder: Path, split: str, strategy: ModelParallelStrategy, global_batch: int, saver: Any = None) -> MLP:
    trainer = Trainer(
        strategy=strategy, devices=2, max_epochs=2, gradient_clip_val=CLIP, default_root_dir=folder,
        callbacks=[ParityCheck(global_batch), *([saver] if saver else [])], enable_checkpointing=saver is not None,
        **QUIET,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MLP(split)
    trainer.fit(model, loader(batch_size=4))
    weights = full_weights(model)
    rank = trainer.global_rank
    (folder / f"{split}{rank}.json").write_text(json.dumps(model.report))
    if rank == 0:
        torch.save(weights, folder / f"{split}_weights.pt")
    return model


def main(folder: Path) -> None:
    saver = ModelCheckpoint(dirpath=folder / "tensor", filename="last-epoch")
    # 1 x 2: the agent process leaves in this fit; the rest runs in the two workers
    fit(folder, "tensor", ModelParallelStrategy(timeout=TIMEOUT), global_batch=4, saver=saver)
    fit(folder, "fsdp", ModelParallelStrategy(data_parallel_size=2, timeout=TIMEOUT), global_batch=8)
    trainer = Trainer(strategy=ModelParallelStrategy(timeout=TIMEOUT), devices=2, max_epochs=1, **QUIET)
    try:
        trainer.fit(MLP("none"), loader(batch_size=4))
        message = "no error"
    except ConfigurationError as error:
        message = str(error)
    (folder / f"error{trainer.global_rank}.txt").write_text(message)


# ---------------------------------------------------------------------- the test
def check_parity(folder: Path, split: str, mesh: list[Any], batches: int) -> None:
    ranks = [json.loads((folder / f"{split}{r}.json").read_text()) for r in (0, 1)]
    for report in ranks:
        assert report["built_on_meta"] is True and report["mesh"] == mesh
        assert report["batches"] == batches and report["global_step"] == 2 * batches
        assert report["max_weight_difference"] < 1e-5
        assert report["norms"] == pytest.approx(report["reference_norms"], rel=1e-5)
        assert max(report["norms"]) > CLIP  # clipping did happen
    assert ranks[0]["norms"] == ranks[1]["norms"]  # the same global norm on every rank
    shards = ranks[0]["shards"]
    if split == "tensor":  # colwise: rows split; rowwise: columns split, bias replicated
        assert shards["mlp.0.weight"] == [[8, 4], [16, 4]] and shards["mlp.0.bias"] == [[8], [16]]
        assert shards["mlp.2.weight"] == [[1, 8], [1, 16]] and shards["mlp.2.bias"] == [[1], [1]]
    else:
        assert shards["mlp.0.weight"] == [[8, 4], [16, 4]]


def test_model_parallel_trainer_end_to_end(tmp_path: Path) -> None:
    process = run_python(__file__, str(tmp_path), timeout=240)
    assert process.returncode == 0, explain(process)
    # tensor parallel: both ranks of the TP group see all 8 batches of 4
    check_parity(tmp_path, "tensor", [[1, 2], ["data_parallel", "tensor_parallel"]], batches=8)
    check_parity(tmp_path, "fsdp", [[2, 1], ["data_parallel", "tensor_parallel"]], batches=4)
    for rank in (0, 1):
        message = (tmp_path / f"error{rank}.txt").read_text()
        assert "parallelize_fn missing" in message and "configure_model" in message, message

    folder = tmp_path / "tensor" / "last-epoch.ckpt"
    assert folder.is_dir()
    loaded = MLP.load_from_checkpoint(folder)
    trained = torch.load(tmp_path / "tensor_weights.pt", weights_only=True)
    assert loaded.state_dict().keys() == trained.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, trained[key]), key


if __name__ == "__main__":
    main(Path(sys.argv[1]))
