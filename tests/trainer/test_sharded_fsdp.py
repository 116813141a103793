"""The Trainer with FSDP on two real gloo ranks: meta init, parity, global-norm clipping, sharded checkpoints.

One job (``python test_sharded_fsdp.py FOLDER popen``, re-run as two workers by the ``popen`` launcher, the
default of ``strategy="fsdp"``) runs three fits; each rank asserts what it can see itself and writes
what the test compares across ranks and runs:

1. parity: layers built in ``configure_model`` land on the meta device and are materialised shard by
   shard; two epochs with norm clipping equal a plain single-process loop on the whole batches, and the
   norm ``clip_gradients`` returns is the unsharded model's, identical on both ranks;
2. exact resume: four epochs with dropout, shuffling, Adam and a scheduler, checkpointed as sharded
   folders (top-k, last, every epoch); a new ``Trainer(strategy="fsdp")`` resumes from the folder of
   epoch 1, then validates the same module again;
3. a plain single-process checkpoint file resumed by an FSDP run saving full (single-file) checkpoints.

The test then loads the folders in this process: ``load_from_checkpoint`` and ``consolidate``. A second,
small job forks its workers (``start_method="fork"``): the caller's module gets the whole trained weights.
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
from torchloom.core.checkpoint import distributed as sharded_io
from torchloom.core.checkpoint.consolidate import consolidate
from torchloom.core.strategies.fsdp import FSDPStrategy
from torchloom.trainer import LoomModule, Trainer
from torchloom.trainer.callbacks import Callback, ModelCheckpoint

pytestmark = pytest.mark.slow

TIMEOUT = datetime.timedelta(seconds=60)
CLIP = 1.0
QUIET: dict[str, Any] = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False}


def dataset(n: int = 32, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, 3 * x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=generator))


def loader(batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader[Any]:
    return DataLoader(dataset(seed=seed), batch_size=batch_size, shuffle=shuffle)


def build_layers(dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
    )


class Net(LoomModule):
    """Its layers are built in ``configure_model``; it records what it saw there and the clipped norms."""

    def __init__(self, lr: float = 0.05, dropout: float = 0.0, adam: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: nn.Sequential | None = None
        self.built_on_meta: bool | None = None
        self.mesh: list[Any] | None = None
        self.clip_norms: list[float] = []

    def configure_model(self) -> None:
        if self.net is not None:  # the same module fits, then validates: build once
            return
        self.net = build_layers(self.hparams["dropout"])
        self.built_on_meta = all(p.is_meta for p in self.net.parameters())
        mesh = self.device_mesh
        self.mesh = None if mesh is None else [list(mesh.shape), list(mesh.mesh_dim_names or ())]

    def forward(self, x: Tensor) -> Tensor:
        assert self.net is not None
        output: Tensor = self.net(x)
        return output

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = nn.functional.mse_loss(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]), sync_dist=True)
        self.log("order", -float(self.current_epoch))  # every epoch is "better": top-k must drop old folders

    def configure_optimizers(self) -> Any:
        if not self.hparams["adam"]:
            return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.7)}

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        norm = self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if norm is not None:
            self.clip_norms.append(float(norm))


def whole(tensor: Tensor) -> Tensor:
    gather = getattr(tensor, "full_tensor", None)
    full: Tensor = gather() if callable(gather) else tensor
    return full.detach().clone()


def full_weights(module: nn.Module) -> dict[str, Tensor]:
    """The module's whole weights on every rank (a collective under FSDP: every rank calls it)."""
    return {key: whole(value) for key, value in module.state_dict().items()}


def write(folder: Path, name: str, data: dict[str, Any]) -> None:
    (folder / name).write_text(json.dumps(data))


def read(folder: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / name).read_text())
    return data


# ---------------------------------------------------------------------- the workers
class ParityCheck(Callback):
    """Trains the initial weights with a plain loop on the whole batches of both ranks and compares."""

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        self.initial = full_weights(module)
        self.shards = {name: [list(p.to_local().shape), list(p.shape)] for name, p in module.named_parameters()}

    def on_fit_end(self, trainer: Any, module: Any) -> None:
        reference = build_layers(0.0)
        reference.load_state_dict({key.removeprefix("net."): value for key, value in self.initial.items()})
        optimizer = torch.optim.SGD(reference.parameters(), lr=module.hparams["lr"], momentum=0.9)
        norms = []
        for _ in range(trainer.current_epoch):
            for x, y in loader(batch_size=8):  # the global batch of a step: rank 0's 4 rows and rank 1's
                nn.functional.mse_loss(reference(x), y).backward()  # type: ignore[no-untyped-call]
                norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)))
                optimizer.step()
                optimizer.zero_grad()
        trained = full_weights(module)
        difference = max((trained["net." + k] - v).abs().max().item() for k, v in reference.state_dict().items())
        report = {
            "built_on_meta": module.built_on_meta,
            "mesh": module.mesh,
            "shards": self.shards,
            "norms": module.clip_norms,
            "reference_norms": norms,
            "max_weight_difference": difference,
            "global_step": trainer.global_step,
        }
        write(Path(trainer.default_root_dir), f"parity{trainer.global_rank}.json", report)


def run_parity(folder: Path) -> None:
    strategy = FSDPStrategy(auto_wrap_policy={nn.Linear}, timeout=TIMEOUT)
    trainer = Trainer(
        strategy=strategy, devices=2, max_epochs=2, gradient_clip_val=CLIP, default_root_dir=folder,
        enable_checkpointing=False, callbacks=[ParityCheck()], **QUIET,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer.fit(Net(), loader(batch_size=4))


def run_resume(folder: Path) -> None:
    """Four epochs in one go, then a new trainer resumes from the folder saved after epoch 1 (two epochs)."""
    kwargs: dict[str, Any] = {"max_epochs": 4, "num_sanity_val_steps": 1, "gradient_clip_val": CLIP, **QUIET}
    top_k = ModelCheckpoint(dirpath=folder / "top_k", monitor="order", save_top_k=2, save_last=True)
    every = ModelCheckpoint(dirpath=folder / "every", filename="{epoch}", save_top_k=-1)
    trainer = Trainer(strategy="fsdp", devices=2, callbacks=[top_k, every], default_root_dir=folder, **kwargs)
    torch.manual_seed(0)
    model = Net(lr=0.01, dropout=0.2, adam=True)
    trainer.fit(model, loader(batch_size=4, shuffle=True), loader(batch_size=4, seed=1))
    uninterrupted = full_weights(model)

    resumed_trainer = Trainer(strategy="fsdp", devices=2, enable_checkpointing=False, default_root_dir=folder, **kwargs)
    loaded_in_place = record_in_place_loads()
    torch.manual_seed(1)  # another initialisation: the checkpoint must overwrite all of it
    resumed = Net(lr=0.01, dropout=0.2, adam=True)
    resumed_trainer.fit(
        resumed,
        loader(batch_size=4, shuffle=True),
        loader(batch_size=4, seed=1),
        ckpt_path=folder / "every" / "epoch=1.ckpt",
    )
    (validated,) = resumed_trainer.validate(resumed, loader(batch_size=4, seed=1), verbose=False)
    weights = full_weights(resumed)  # after validate too: the module stays sharded and usable
    if trainer.global_rank == 0:
        torch.save({"uninterrupted": uninterrupted, "resumed": weights}, folder / "resume_weights.pt")
    report = {
        "global_step": resumed_trainer.global_step,
        "epoch": resumed_trainer.current_epoch,
        "val_loss": validated["val_loss"],
        "best_model_path": top_k.best_model_path,
        "last_model_path": top_k.last_model_path,
        "best_k_models": sorted(top_k.best_k_models),
        "loaded_in_place": loaded_in_place,
    }
    write(folder, f"resume{trainer.global_rank}.json", report)


def record_in_place_loads() -> list[list[str]]:
    """The entries each sharded load fills in place (DCP reads only this rank's shards of those)."""
    loads: list[list[str]] = []
    original = sharded_io.load_sharded

    def recording(path: Any, live: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        loads.append(sorted(live or {}))
        return original(path, live, **kwargs)

    sharded_io.load_sharded = recording
    return loads


class LoadedWeights(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: Any, module: Any) -> None:
        saved = torch.load(self.path, weights_only=True)["state_dict"]
        loaded = full_weights(module)
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
        assert trainer.global_step == 4  # resumes after the file's epoch (4 steps)


def run_from_file(folder: Path) -> None:
    """A single-process checkpoint file resumed under FSDP, which saves full files."""
    plain = str(folder / "single" / "single.ckpt")
    full = ModelCheckpoint(dirpath=folder / "full", filename="{epoch}", save_top_k=-1)
    trainer = Trainer(
        strategy=FSDPStrategy(state_dict_type="full", timeout=TIMEOUT), devices=2, max_epochs=2,
        gradient_clip_val=CLIP, callbacks=[LoadedWeights(plain), full], default_root_dir=folder, **QUIET,
    )  # fmt: skip
    model = Net()
    trainer.fit(model, loader(batch_size=4), ckpt_path=plain)
    weights = full_weights(model)
    if trainer.global_rank == 0:
        torch.save(weights, folder / "from_file_weights.pt")


class SaveWholeWeights(Callback):
    def on_fit_end(self, trainer: Any, module: Any) -> None:
        weights = full_weights(module)  # every rank gathers; rank 0 writes
        if trainer.global_rank == 0:
            torch.save(weights, Path(trainer.default_root_dir) / "worker_weights.pt")


def run_forked(folder: Path) -> None:
    """Forked workers: the caller's module (its layers built in the workers) receives the whole weights."""
    strategy = FSDPStrategy(start_method="fork", timeout=TIMEOUT)
    trainer = Trainer(
        strategy=strategy, devices=2, max_epochs=1, default_root_dir=folder, enable_checkpointing=False,
        callbacks=[SaveWholeWeights()], **QUIET,
    )  # fmt: skip
    model = Net()
    trainer.fit(model, loader(batch_size=4))
    assert trainer.global_step == 4 and model.net is not None
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, folder / "caller_weights.pt")


def main(folder: Path, mode: str) -> None:
    if mode == "fork":
        run_forked(folder)
        return
    run_parity(folder)  # the agent process leaves here: the rest runs in the two workers
    run_resume(folder)
    run_from_file(folder)


# ---------------------------------------------------------------------- the test
def single_process_runs(folder: Path) -> dict[str, Tensor]:
    """One epoch on one device, saved to a file; and two epochs in one go, the weights the FSDP resume must reach."""
    kwargs: dict[str, Any] = {"devices": 1, "gradient_clip_val": CLIP, "enable_model_summary": False, **QUIET}
    saver = ModelCheckpoint(dirpath=folder / "single", filename="single")
    torch.manual_seed(0)
    Trainer(max_epochs=1, callbacks=[saver], **kwargs).fit(Net(), loader(batch_size=8))
    torch.manual_seed(0)
    model = Net()
    Trainer(max_epochs=2, enable_checkpointing=False, **kwargs).fit(model, loader(batch_size=8))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_equal(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), f"{key}: max |diff| {(actual[key] - expected[key]).abs().max()}"


def check_parity(folder: Path) -> None:
    ranks = [read(folder, f"parity{r}.json") for r in (0, 1)]
    for report in ranks:
        assert report["built_on_meta"] is True  # no rank ever held the whole model
        assert report["mesh"] == [[2], ["shard"]]
        for name, (local, whole_shape) in report["shards"].items():
            if whole_shape[0] % 2 == 0:
                assert local[0] * 2 == whole_shape[0], name
        assert report["global_step"] == 8 and report["max_weight_difference"] < 1e-5
        assert report["norms"] == pytest.approx(report["reference_norms"], rel=1e-5)
        assert max(report["norms"]) > CLIP  # clipping did happen
    assert ranks[0]["norms"] == ranks[1]["norms"]  # the same global norm on every rank


def check_checkpoint_folders(folder: Path, report: dict[str, Any]) -> None:
    top_k = sorted(p.name for p in (folder / "top_k").iterdir())
    assert top_k == ["epoch=2-step=12.ckpt", "epoch=3-step=16.ckpt", "last.ckpt"], top_k  # epochs 0, 1 removed
    assert all(sharded_io.is_sharded_checkpoint(folder / "top_k" / name) for name in top_k)
    assert report["best_model_path"].endswith("epoch=3-step=16.ckpt")
    assert report["last_model_path"].endswith("last.ckpt")
    every = sorted(p.name for p in (folder / "every").iterdir())
    assert every == [f"epoch={e}.ckpt" for e in range(4)]


def check_loading_in_one_process(folder: Path, uninterrupted: dict[str, Tensor], tmp_path: Path) -> None:
    loaded = Net.load_from_checkpoint(folder / "top_k" / "last.ckpt")
    assert loaded.hparams["adam"] is True and loaded.net is not None
    assert_equal({k: v.detach() for k, v in loaded.state_dict().items()}, uninterrupted)
    single_file = consolidate(folder / "every" / "epoch=3.ckpt", tmp_path / "consolidated.ckpt")
    checkpoint = torch.load(single_file, weights_only=True)
    assert_equal(checkpoint["state_dict"], uninterrupted)
    assert checkpoint["epoch"] == 3 and checkpoint["loops"]["fit"]["global_step"] == 16
    assert len(checkpoint["optimizer_states"][0]["state"]) == 6  # Adam's state of the 6 parameters
    # the consolidated file resumes on one device (optimizer state keyed by name is taken too)
    model = Net(lr=0.01, dropout=0.2, adam=True)
    trainer = Trainer(devices=1, max_epochs=5, enable_checkpointing=False, enable_model_summary=False, **QUIET)
    trainer.fit(model, loader(batch_size=8, shuffle=True), ckpt_path=single_file)
    assert trainer.global_step == 16 + 4


def test_fsdp_trainer_end_to_end(tmp_path: Path) -> None:
    continued = single_process_runs(tmp_path)
    process = run_python(__file__, str(tmp_path), "popen", timeout=240)
    assert process.returncode == 0, explain(process)
    check_parity(tmp_path)

    ranks = [read(tmp_path, f"resume{r}.json") for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["global_step"] == 16 and ranks[0]["epoch"] == 4
    assert ranks[0]["loaded_in_place"] == [["optimizer_states", "state_dict"]]  # shards only, no whole copy
    weights = torch.load(tmp_path / "resume_weights.pt", weights_only=True)
    assert_equal(weights["resumed"], weights["uninterrupted"])  # bit-identical after stop-and-resume
    check_checkpoint_folders(tmp_path, ranks[0])
    check_loading_in_one_process(tmp_path, weights["uninterrupted"], tmp_path)

    from_file = torch.load(tmp_path / "from_file_weights.pt", weights_only=True)
    for key, value in continued.items():
        assert torch.allclose(from_file[key], value, atol=1e-5), key
    files = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert files == ["epoch=1.ckpt"] and (tmp_path / "full" / "epoch=1.ckpt").is_file()  # full saves: one file
    assert_equal(Net.load_from_checkpoint(tmp_path / "full" / "epoch=1.ckpt").state_dict(), from_file)


def test_forked_fsdp_workers_send_the_whole_weights_back(tmp_path: Path) -> None:
    process = run_python(__file__, str(tmp_path), "fork", timeout=120)
    assert process.returncode == 0, explain(process)
    caller = torch.load(tmp_path / "caller_weights.pt", weights_only=True)
    assert_equal(caller, torch.load(tmp_path / "worker_weights.pt", weights_only=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "popen")
