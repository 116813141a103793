"""One SPMD run, in its own process (SPMD mode and the device count are fixed per process).

``python -m tests.xla.spmd_job OUT SHARDING`` with ``PJRT_DEVICE=CPU CPU_NUM_DEVICES=n``: trains through
Fabric and through the Trainer with strategy ``xla_spmd`` (FSDPv2) or ``xla_spmd_data``, saves and loads
a checkpoint, and writes what the test checks to ``OUT`` (a torch file).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch_xla
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.utils.data import DataLoader
from torch_xla.distributed.spmd import XLAShardedTensor

from tests.xla.loops import BATCH, Regressor, cpu_weights, dataset, fabric_run, model, trainer_run
from torchloom.core.checkpoint import distributed as sharded_io
from torchloom.core.checkpoint.consolidate import consolidate
from torchloom.core.strategies.single_device import SingleDeviceStrategy
from torchloom.fabric import Fabric
from torchloom.trainer import Trainer
from torchloom.trainer.callbacks import Callback, ModelCheckpoint


class MomentumRegressor(Regressor):
    def configure_optimizers(self) -> torch.optim.Optimizer:  # state to resume: a momentum buffer per parameter
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class SpecProbe(Callback):
    """The sharding of the first weight and its momentum buffer at the first step of a fit (after the restore)."""

    def __init__(self) -> None:
        self.specs: dict[str, str] = {}

    def on_train_batch_start(self, trainer: Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        param = module.net.get_parameter("0.weight")
        state = trainer.optimizers[0].state.get(param, {})
        if not self.specs:
            self.specs = {
                "momentum_spec": torch_xla._XLAC._get_xla_sharding_spec(state["momentum_buffer"])
                if "momentum_buffer" in state
                else "none",
                "param_spec": torch_xla._XLAC._get_xla_sharding_spec(param),
            }


def trainer_resume(folder: Path, strategy: str) -> dict[str, object]:
    """The Trainer: 1 epoch, then resumed from its checkpoint for a 2nd, against 2 epochs in one go."""

    probe = SpecProbe()

    def fit(epochs: int, root: Path, ckpt_path: Path | None = None) -> tuple[Trainer, MomentumRegressor]:
        checkpoints = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
        module = MomentumRegressor()
        trainer = Trainer(
            max_epochs=epochs,
            accelerator="tpu",
            strategy=strategy,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            callbacks=[checkpoints, probe] if ckpt_path else [checkpoints],
        )
        trainer.fit(module, train_dataloaders=DataLoader(dataset(), batch_size=BATCH), ckpt_path=ckpt_path)
        return trainer, module

    _, whole = fit(2, folder / "straight")
    fit(1, folder / "first")
    shards_loaded = []
    load_shards = XLAShardedTensor.load_local_shards_

    def counted(self: XLAShardedTensor, shards: object) -> object:
        shards_loaded.append(self.global_tensor.shape)
        return load_shards(self, shards)

    XLAShardedTensor.load_local_shards_ = counted  # type: ignore[method-assign]
    try:
        trainer, resumed = fit(2, folder / "second", ckpt_path=folder / "first" / "last.ckpt")
    finally:
        XLAShardedTensor.load_local_shards_ = load_shards  # type: ignore[method-assign]
    return {
        "checkpoint_is_sharded": sharded_io.is_sharded_checkpoint(folder / "first" / "last.ckpt"),
        "resumed_equals_straight": all(
            torch.equal(a, b)
            for a, b in zip(cpu_weights(resumed.state_dict()).values(), cpu_weights(whole.state_dict()).values())
        ),
        "resumed_steps": trainer.global_step,
        "shards_loaded_in_place": len(shards_loaded),
        **probe.specs,
    }


def fresh_optimizer_state(fabric: Fabric) -> dict[str, object]:
    """An Adam state dict after one step, on the CPU."""
    built = model()
    module, optimizer = fabric.setup(built, torch.optim.Adam(built.parameters(), lr=0.01))
    fabric.backward(module(fabric.to_device(torch.randn(8, 8))).sum())
    optimizer.step()
    state = optimizer.state_dict()
    return {
        "state": {i: {k: v.cpu() for k, v in entry.items()} for i, entry in state["state"].items()},
        "param_groups": state["param_groups"],
    }


def across_strategies(folder: Path, module: torch.nn.Module, fabric: Fabric) -> dict[str, object]:
    """The SPMD checkpoint is the sharded format FSDP writes: the CPU reads it, and one written from CPU loads."""
    saved = cpu_weights(module.state_dict())
    chunks = FileSystemReader(folder / "ckpt").read_metadata().state_dict_metadata["model/0.weight"].chunks
    on_cpu = SingleDeviceStrategy("cpu").load_checkpoint(folder / "ckpt")
    consolidated = torch.load(consolidate(folder / "ckpt", folder / "one.pt"), weights_only=True)
    written_on_cpu = {"model": {name: torch.full_like(value, 0.5) for name, value in saved.items()}}
    sharded_io.save_sharded(folder / "from_cpu", written_on_cpu, {"model": "module"}, SingleDeviceStrategy("cpu"))
    target = model()
    loaded, _ = fabric.setup(target, torch.optim.SGD(target.parameters(), lr=0.1))
    shards_loaded = []
    load_shards = XLAShardedTensor.load_local_shards_  # SPMDLoadPlanner's last step for each sharded tensor

    def counted(self: XLAShardedTensor, shards: object) -> object:
        shards_loaded.append(self.global_tensor.shape)
        return load_shards(self, shards)

    XLAShardedTensor.load_local_shards_ = counted  # type: ignore[method-assign]
    try:
        fabric.load(folder / "from_cpu", {"model": loaded})
    finally:
        XLAShardedTensor.load_local_shards_ = load_shards  # type: ignore[method-assign]
    # a full file (the optimizer state read whole, as the Trainer reads every checkpoint) is sharded on load too
    optimizer_state = fresh_optimizer_state(fabric)
    whole = {"model": saved, "optimizer": optimizer_state}
    torch.save(whole, folder / "whole.pt")
    target = model()
    loaded_whole, whole_optimizer = fabric.setup(target, torch.optim.Adam(target.parameters(), lr=0.01))
    fabric.load(folder / "whole.pt", {"model": loaded_whole, "optimizer": whole_optimizer})
    whole_exp_avg_spec = torch_xla._XLAC._get_xla_sharding_spec(
        whole_optimizer.state[target.get_parameter("0.weight")]["exp_avg"]
    )
    return {
        "whole_file_exp_avg_spec": whole_exp_avg_spec,
        "chunks_of_first_weight": len(chunks),
        "cpu_reads_it": on_cpu["step"] == 7 and all(torch.equal(on_cpu["model"][k], v) for k, v in saved.items()),
        "consolidates": all(torch.equal(consolidated["model"][k], v) for k, v in saved.items()),
        "cpu_optimizer_state": sorted(on_cpu["optimizer"]["state"]),
        "loads_cpu_checkpoint": all(bool((v == 0.5).all()) for v in cpu_weights(loaded.state_dict()).values()),
        "shards_loaded_in_place": len(shards_loaded),
        "spec_after_cpu_load": torch_xla._XLAC._get_xla_sharding_spec(target.get_parameter("0.weight")),
    }


def main(out: Path, strategy: str) -> None:
    fabric = Fabric(accelerator="tpu", strategy=strategy, precision="32-true")
    weights, losses = fabric_run(fabric, clip=0.5)

    built = model()
    module, optimizer = fabric.setup(built, torch.optim.Adam(built.parameters(), lr=0.01))
    specs = {name: torch_xla._XLAC._get_xla_sharding_spec(p) for name, p in built.named_parameters()}
    loss = module(fabric.to_device(torch.randn(8, 8))).sum()  # moved and sharded by the strategy
    fabric.backward(loss)
    optimizer.step()
    fabric.save(out.parent / "ckpt", {"model": module, "optimizer": optimizer, "step": 7})
    other = model()
    torch.manual_seed(3)
    for p in other.parameters():
        torch.nn.init.normal_(p)
    fresh, fresh_optimizer = fabric.setup(other, torch.optim.Adam(other.parameters(), lr=0.01))
    state = {"model": fresh, "optimizer": fresh_optimizer, "step": 0}
    fabric.load(out.parent / "ckpt", state)
    restored = {
        "step": state["step"],
        "weights_equal": all(
            torch.equal(a, b)
            for a, b in zip(cpu_weights(fresh.state_dict()).values(), cpu_weights(module.state_dict()).values())
        ),
        "exp_avg_equal": torch.equal(
            fresh_optimizer.state_dict()["state"][0]["exp_avg"].cpu(),
            optimizer.state_dict()["state"][0]["exp_avg"].cpu(),
        ),
        "specs_after_load": {name: torch_xla._XLAC._get_xla_sharding_spec(p) for name, p in other.named_parameters()},
        # read shard by shard into tensors sharded like their parameter, not whole and replicated
        "exp_avg_specs_after_load": {
            name: torch_xla._XLAC._get_xla_sharding_spec(fresh_optimizer.state[p]["exp_avg"])
            for name, p in other.named_parameters()
        },
        "step_after_load": fresh_optimizer.state[other.get_parameter("0.weight")]["step"].item(),
    }
    restored.update(across_strategies(out.parent, module, fabric))
    _, trained = trainer_run(str(out.parent / "trainer"), accelerator="tpu", strategy=strategy)
    resume = trainer_resume(out.parent, strategy)
    torch.save(
        {
            "weights": weights,
            "losses": losses,
            "specs": specs,
            "restored": restored,
            "trainer_weights": cpu_weights(trained.state_dict()),
            "trainer_resume": resume,
            "strategy": type(fabric.strategy).__name__,
        },
        out,
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
