"""FSDPStrategy and FSDPPrecision in one process: arguments, wiring, precision adaptation, and a real
one-rank gloo group for the setup/step/checkpoint paths (two ranks: test_fsdp_multiprocess.py)."""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy

from torchloom.core.accelerators.cpu import CPUAccelerator
from torchloom.core.connector import Connector
from torchloom.core.environments.local import LocalEnvironment
from torchloom.core.errors import CheckpointError, ConfigurationError
from torchloom.core.launchers.multiprocessing import MultiprocessingLauncher
from torchloom.core.launchers.subprocess_script import SubprocessScriptLauncher
from torchloom.core.precision.amp import MixedPrecision
from torchloom.core.precision.fsdp import FSDP_PRECISIONS, FSDPPrecision
from torchloom.core.precision.precision import Precision
from torchloom.core.registry import STRATEGIES
from torchloom.core.strategies.fsdp import FSDPStrategy
from torchloom.core.strategies.single_device import SingleDeviceStrategy


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(x)) + x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.blocks = nn.Sequential(Block(), Block())
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.out(self.blocks(self.inp(x)))
        return out


def full(tensor: Any) -> Tensor:
    """The whole tensor behind a DTensor."""
    whole: Tensor = tensor.full_tensor()
    return whole


def wired(world: int = 1, **kwargs: Any) -> FSDPStrategy:
    strategy = FSDPStrategy(
        accelerator=CPUAccelerator(),
        parallel_devices=[torch.device("cpu")] * world,
        cluster_environment=LocalEnvironment(),
        **kwargs,
    )
    strategy.set_world_ranks()
    return strategy


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.setenv(name, "")  # recorded, so that whatever a test sets is undone afterwards
        monkeypatch.delenv(name)


@pytest.fixture
def one_rank(clean_env: None) -> Generator[FSDPStrategy, None, None]:
    """An FSDPStrategy over a real one-rank gloo group, wired by the connector."""
    strategy = FSDPStrategy(auto_wrap_policy={Block}, timeout=datetime.timedelta(seconds=60))
    Connector(accelerator="cpu", strategy=strategy, devices=1).resolve()
    strategy.setup_environment()
    try:
        yield strategy
    finally:
        strategy.teardown()


# ---------------------------------------------------------------------- arguments and wiring
def test_registered_names_and_launchers(clean_env: None) -> None:
    plain, offload = STRATEGIES.get("fsdp"), STRATEGIES.get("fsdp_cpu_offload")
    assert isinstance(plain, FSDPStrategy) and isinstance(offload, FSDPStrategy)
    assert plain._cpu_offload is False and offload._cpu_offload is True
    assert plain.start_method == "popen" and plain.state_dict_type == "sharded"
    assert plain.sharding_strategy == "FULL_SHARD" and plain.restore_checkpoint_after_setup
    strategy = wired(2)
    strategy.configure_launcher()
    assert isinstance(strategy.launcher, SubprocessScriptLauncher)  # "fsdp" re-runs the script, like "ddp"
    spawned = wired(2, start_method="spawn")
    spawned.configure_launcher()
    assert isinstance(spawned.launcher, MultiprocessingLauncher) and spawned.launcher.start_method == "spawn"
    assert "sharding_strategy='FULL_SHARD'" in repr(strategy) and "state_dict_type='sharded'" in repr(strategy)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sharding_strategy": "FULL"}, r"sharding_strategy='FULL'.*'FULL_SHARD', 'SHARD_GRAD_OP', 'NO_SHARD'"),
        ({"state_dict_type": "local"}, r"state_dict_type='local'.*'sharded', 'full'"),
        ({"start_method": "thread"}, r"start_method='thread'.*'popen', 'spawn', 'fork', 'notebook'"),
        ({"sharding_strategy": "SHARD_GRAD_OP", "reshard_after_forward": True}, "contradicts"),
        ({"device_mesh": (1, 2)}, r"device_mesh=\(1, 2\).*'HYBRID_SHARD'"),
        ({"cpu_offload": "yes"}, r"cpu_offload='yes'.*CPUOffloadPolicy"),
        ({"mixed_precision": torch.bfloat16}, "MixedPrecisionPolicy"),
        ({"auto_wrap_policy": "Block"}, r"auto_wrap_policy='Block'.*set of nn.Module classes"),
        ({"activation_checkpointing_policy": 3}, "activation_checkpointing_policy=3"),
        ({"mesh": None}, r"unknown arguments \['mesh'\].*'shard_placement_fn'"),
        ({"timeout": datetime.timedelta(0)}, "timeout"),
    ],
)
def test_bad_arguments_name_the_valid_choices(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        FSDPStrategy(**kwargs)


def test_things_that_need_setup_or_a_module_say_so(clean_env: None) -> None:
    strategy = wired()
    with pytest.raises(ConfigurationError, match=r"device_mesh exists once setup_environment\(\)"):
        strategy.device_mesh  # noqa: B018
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    with pytest.raises(ConfigurationError, match="needs module="):
        strategy.get_optimizer_state(optimizer)
    with pytest.raises(ConfigurationError, match="needs module="):
        strategy.load_optimizer_state(optimizer, {})


def test_optimizers_that_cannot_be_rebound_are_refused(clean_env: None) -> None:
    strategy, model = wired(), Net()
    stepped = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    stepped.step()
    with pytest.raises(ConfigurationError, match="already has state"):
        strategy.setup_module_and_optimizers(model, [stepped])
    foreign = torch.optim.SGD([*model.parameters(), nn.Parameter(torch.ones(7))], lr=0.1)
    with pytest.raises(ConfigurationError, match=r"1 parameter\(s\) that are not in the module.*\(7,\)"):
        strategy.setup_module_and_optimizers(model, [foreign])


def test_device_mesh_shapes(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mesh sizes per sharding strategy, here for 2 nodes x 2 CUDA devices (init_device_mesh recorded)."""
    calls: list[tuple[str, tuple[int, ...], Any]] = []

    def record(device_type: str, shape: tuple[int, ...], mesh_dim_names: Any = None) -> str:
        calls.append((device_type, shape, mesh_dim_names))
        return "mesh"

    monkeypatch.setattr(torch.distributed.device_mesh, "init_device_mesh", record)
    cuda = [torch.device("cuda", 0), torch.device("cuda", 1)]
    for sharding in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"):
        strategy = FSDPStrategy(
            parallel_devices=cuda, cluster_environment=LocalEnvironment(), sharding_strategy=sharding
        )
        strategy.num_nodes = 2
        strategy.set_world_ranks()
        assert strategy._build_device_mesh() == "mesh"
    assert calls == [
        ("cuda", (4,), ("shard",)),
        ("cuda", (4,), ("shard",)),
        ("cuda", (4, 1), ("replicate", "shard")),
        ("cuda", (2, 2), ("replicate", "shard")),
    ]
    custom = FSDPStrategy(
        parallel_devices=cuda, cluster_environment=LocalEnvironment(), sharding_strategy="HYBRID_SHARD"
    )
    custom._mesh_arg = (1, 4)
    custom.num_nodes = 2
    custom.set_world_ranks()
    custom._build_device_mesh()
    assert calls[-1] == ("cuda", (1, 4), ("replicate", "shard"))
    custom._mesh_arg = (3, 1)
    with pytest.raises(
        ConfigurationError, match=r"\(3, 1\) \(replicate x shard\) does not multiply to the world size 4"
    ):
        custom._build_device_mesh()


def test_cpu_offload_pins_memory_only_with_an_accelerator() -> None:
    on_cpu = FSDPStrategy(parallel_devices=[torch.device("cpu")], cpu_offload=CPUOffloadPolicy(pin_memory=True))
    policy = on_cpu._offload_policy()
    assert isinstance(policy, CPUOffloadPolicy) and policy.pin_memory is False
    on_gpu = FSDPStrategy(parallel_devices=[torch.device("cuda", 0)], cpu_offload=True)
    policy = on_gpu._offload_policy()
    assert isinstance(policy, CPUOffloadPolicy) and policy.pin_memory is True
    assert not isinstance(FSDPStrategy(parallel_devices=[torch.device("cpu")])._offload_policy(), CPUOffloadPolicy)


# ---------------------------------------------------------------------- precision
@pytest.mark.parametrize("name", FSDP_PRECISIONS)
def test_connector_swaps_in_the_fsdp_precision(clean_env: None, name: str) -> None:
    setup = Connector(accelerator="cpu", strategy="fsdp", devices=2, precision=name).resolve()
    assert isinstance(setup.precision, FSDPPrecision) and setup.precision.name == name
    assert setup.strategy.precision is setup.precision and setup.precision.device_type == "cpu"


def test_connector_refuses_a_precision_fsdp_cannot_run(clean_env: None) -> None:
    class Custom(Precision):
        pass

    with pytest.raises(ConfigurationError, match=r"cannot run precision=Custom\('32-true'\).*'32-true', 'bf16-mixed'"):
        Connector(accelerator="cpu", strategy="fsdp", devices=2, precision=Custom()).resolve()
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    setup = Connector(accelerator="cpu", strategy="fsdp", precision=MixedPrecision("16-mixed", scaler=scaler)).resolve()
    assert isinstance(setup.precision, FSDPPrecision) and setup.precision.scaler is scaler  # the user's scaler kept


def test_fsdp_precision_policies_and_hooks() -> None:
    bf16 = FSDPPrecision("bf16-mixed").mixed_precision_policy
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    fp16 = FSDPPrecision("16-mixed")
    assert (fp16.mixed_precision_policy.param_dtype, fp16.mixed_precision_policy.reduce_dtype) == (
        torch.float16,
        torch.float32,
    )
    assert fp16.scaler is not None and fp16.skips_nonfinite_steps and fp16.compute_dtype == torch.float16
    for name in ("32-true", "bf16-true", "16-true", "64-true"):
        assert FSDPPrecision(name).mixed_precision_policy == MixedPrecisionPolicy()  # the stored dtype computes
    with FSDPPrecision("bf16-mixed").forward_context():
        assert torch.is_autocast_enabled("cpu")
    true_bf16 = FSDPPrecision("bf16-true")
    assert true_bf16.convert_module(nn.Linear(1, 1)).weight.dtype == torch.bfloat16
    with true_bf16.module_init_context():
        assert nn.Linear(1, 1).weight.dtype == torch.bfloat16
    assert true_bf16.convert_input(torch.ones(1)).dtype == torch.bfloat16
    assert true_bf16.convert_output(torch.ones(1, dtype=torch.bfloat16)).dtype == torch.float32
    half = FSDPPrecision("16-mixed", device_type="cpu")
    with warnings.catch_warnings():  # without CUDA, torch disables the new CUDA grad scaler and says so
        warnings.simplefilter("ignore")
        half.device_type = "cuda"
    assert half.device_type == "cuda" and "device_type='cuda'" in repr(half)
    with pytest.raises(ConfigurationError, match=r"FSDPPrecision\('8-true'\).*'32-true'"):
        FSDPPrecision("8-true")
    with pytest.raises(ConfigurationError, match="takes no scaler"):
        FSDPPrecision("bf16-mixed", scaler=torch.amp.GradScaler("cpu"))


# ---------------------------------------------------------------------- meta-device init
def test_empty_init_builds_on_meta_and_materialize_initialises(clean_env: None) -> None:
    strategy = wired(precision=FSDPPrecision("bf16-true"))
    torch.manual_seed(7)
    with strategy.module_init_context(empty_init=True):
        model = Net()
    with FSDPPrecision("bf16-true").module_init_context():
        torch.manual_seed(7)
        expected = Net()
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())
    strategy.module_to_device(model)  # meta tensors wait for materialize(), after sharding
    kept = nn.Parameter(torch.full((2,), 5.0))
    model.out.register_parameter("kept", kept)  # a real tensor next to meta ones is not overwritten
    strategy.materialize(model)
    assert not any(p.is_meta for p in model.parameters()) and torch.equal(kept, torch.full((2,), 5.0))
    assert model.out.kept is kept
    for (name, param), value in zip(model.named_parameters(), [*expected.parameters(), kept]):
        assert torch.equal(param, value), name  # the weights of a normal init after the same seed

    class Rotary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("freqs", torch.arange(4.0))

    with strategy.module_init_context(empty_init=True):
        bad = nn.Sequential(nn.Linear(2, 2), Rotary())
    with pytest.raises(ConfigurationError, match=r"no reset_parameters\(\).*1 \(Rotary\)"):
        strategy.materialize(bad)
    with strategy.module_init_context(empty_init=False):
        assert nn.Linear(1, 1).weight.device.type == "cpu"


# ---------------------------------------------------------------------- a real one-rank group
def test_one_rank_training_clipping_and_no_sync(one_rank: FSDPStrategy) -> None:
    torch.manual_seed(0)
    reference = Net()
    net = Net()
    net.load_state_dict(reference.state_dict())
    model, [optimizer], _ = one_rank.setup_module_and_optimizers(net, [torch.optim.SGD(net.parameters(), lr=0.1)])
    assert isinstance(model, FSDPModule) and isinstance(net.blocks[0], FSDPModule)
    assert not isinstance(net.inp, FSDPModule)  # only the policy's classes and the root are units
    assert one_rank.device_mesh.shape == (1,)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(2):
        inputs = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
        with one_rank.no_backward_sync(model, enabled=False):
            one_rank.backward(model(inputs).square().mean(), model)
        reference(inputs).square().mean().backward()
        norm = one_rank.clip_gradients_norm(model, optimizer, max_norm=0.1)
        assert torch.allclose(norm, nn.utils.clip_grad_norm_(reference.parameters(), 0.1), atol=1e-6)
        one_rank.clip_gradients_value(model, optimizer, 0.01)
        nn.utils.clip_grad_value_(reference.parameters(), 0.01)
        one_rank.optimizer_step(optimizer)
        ref_optimizer.step()
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(full(param), ref, atol=1e-6), name
    model(torch.ones(1, 3)).sum().backward()
    net.inp.weight.grad.to_local()[0, 0] = float("inf")  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="is inf, so they cannot be clipped"):
        one_rank.clip_gradients_norm(model, optimizer, max_norm=1.0)


def test_one_rank_checkpoints(one_rank: FSDPStrategy, tmp_path: Path) -> None:
    model = one_rank.setup_module(Net())
    optimizers = [torch.optim.Adam(model.parameters(), lr=0.01)]
    model(torch.ones(2, 3)).sum().backward()
    optimizers[0].step()
    state = {"model": model, "optimizers": optimizers, "epoch": 2}
    one_rank.save_checkpoint(tmp_path / "ckpt", state, filter={"model": lambda key, value: "blocks" not in key})
    everything = one_rank.load_checkpoint(tmp_path / "ckpt")  # no state: the whole checkpoint, full tensors
    assert set(everything) == {"model", "optimizers", "epoch"}
    assert sorted(everything["model"]) == ["inp.bias", "inp.weight", "out.bias", "out.weight"]  # filtered
    assert sorted(everything["optimizers"][0]["state"]) == list(range(8))  # optimizer.state_dict()'s form

    fresh = one_rank.setup_module(Net())
    fresh_optimizers = [torch.optim.Adam(fresh.parameters(), lr=0.5)]
    with pytest.raises(RuntimeError, match=r"missing keys \['blocks.0.fc.bias'"):
        one_rank.load_checkpoint(tmp_path / "ckpt", {"model": fresh, "optimizers": fresh_optimizers})
    with pytest.raises(KeyError, match=r"no entry for \['scheduler'\]"):
        one_rank.load_checkpoint(tmp_path / "ckpt", {"scheduler": {}})
    with pytest.raises(ConfigurationError, match="needs its module next to it"):
        one_rank.save_checkpoint(tmp_path / "other", {"optimizer": optimizers[0]})
    (tmp_path / "not_a_checkpoint").mkdir()
    with pytest.raises(CheckpointError, match="is a directory but not a torchloom checkpoint"):
        one_rank.load_checkpoint(tmp_path / "not_a_checkpoint", {})

    one_rank.save_checkpoint(tmp_path / "ckpt", {"model": model, "optimizers": optimizers})
    one_rank.load_checkpoint(tmp_path / "ckpt", {"model": fresh, "optimizers": fresh_optimizers})
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(full(a), full(b))
    assert fresh_optimizers[0].param_groups[0]["lr"] == 0.01
    one_rank.remove_checkpoint(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_single_device_checkpoints_load_into_a_sharded_run_and_back(one_rank: FSDPStrategy, tmp_path: Path) -> None:
    """A plain checkpoint loads into the sharded model; a "full" save is that same plain form."""
    torch.manual_seed(3)
    plain = Net()
    plain_optimizer = torch.optim.Adam(plain.parameters(), lr=0.02)
    plain(torch.ones(2, 3)).sum().backward()
    plain_optimizer.step()
    SingleDeviceStrategy("cpu", accelerator=CPUAccelerator()).save_checkpoint(
        tmp_path / "plain.pt", {"model": plain, "optimizer": plain_optimizer}
    )
    model = one_rank.setup_module(Net())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    one_rank.load_checkpoint(tmp_path / "plain.pt", {"model": model, "optimizer": optimizer})
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(full(a), b)

    full_strategy = FSDPStrategy(state_dict_type="full")
    Connector(accelerator="cpu", strategy=full_strategy, devices=1).resolve()
    full_strategy.setup_environment()  # joins the existing group
    full_strategy.save_checkpoint(tmp_path / "full.pt", {"model": model, "optimizer": optimizer})
    saved = torch.load(tmp_path / "full.pt", weights_only=True)
    again = Net()
    again.load_state_dict(saved["model"])
    again_optimizer = torch.optim.Adam(again.parameters())
    again_optimizer.load_state_dict(saved["optimizer"])
    expected, actual = plain_optimizer.state_dict(), again_optimizer.state_dict()
    assert actual["param_groups"] == expected["param_groups"]
    for index, values in expected["state"].items():
        for key, value in values.items():
            assert torch.equal(actual["state"][index][key], value), (index, key)
    assert full_strategy.get_optimizer_state(optimizer, model)["param_groups"][0]["params"] == list(range(8))


def test_fully_shard_kwargs_and_wrap_policies_reach_fully_shard(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    model = Net()
    names = {id(m): n for n, m in model.named_modules()}
    strategy = wired(
        auto_wrap_policy=lambda module, name: name.startswith("blocks."),
        sharding_strategy="SHARD_GRAD_OP",
        mixed_precision=MixedPrecisionPolicy(param_dtype=torch.float16),
        ignored_params=None,
    )
    monkeypatch.setattr(
        torch.distributed.fsdp, "fully_shard", lambda module, **kw: calls.append((names.get(id(module), "?"), kw))
    )
    strategy._device_mesh = "mesh"  # type: ignore[assignment]
    assert strategy.setup_module(model) is model
    assert [name for name, _ in calls] == ["blocks.1.fc", "blocks.1", "blocks.0.fc", "blocks.0", ""]  # innermost first
    options = calls[0][1]
    assert options["mesh"] == "mesh" and options["reshard_after_forward"] is False and options["ignored_params"] is None
    assert options["mp_policy"].param_dtype == torch.float16


@pytest.mark.cuda
@pytest.mark.parametrize("cpu_offload", [False, True])
def test_one_cuda_device(clean_env: None, tmp_path: Path, cpu_offload: bool) -> None:
    """A one-rank NCCL job on cuda:0: bf16-mixed training, clipping, and sharded + full checkpoints."""
    strategy = FSDPStrategy(auto_wrap_policy={Block}, cpu_offload=cpu_offload, timeout=datetime.timedelta(seconds=60))
    setup = Connector(accelerator="cuda", strategy=strategy, devices=1, precision="bf16-mixed").resolve()
    assert isinstance(setup.precision, FSDPPrecision) and setup.precision.device_type == "cuda"
    strategy.setup_environment()
    try:
        assert strategy.process_group_backend == "nccl" and strategy.device_mesh.device_type == "cuda"
        with strategy.module_init_context(empty_init=True):
            net = Net()
        model, [optimizer], _ = strategy.setup_module_and_optimizers(net, [torch.optim.Adam(net.parameters())])
        expected_device = "cpu" if cpu_offload else "cuda"
        assert all(full(p).device.type == expected_device for p in model.parameters())
        with setup.precision.forward_context():
            out = model(torch.randn(4, 3, device="cuda"))
        strategy.backward(setup.precision.convert_output(out).square().mean(), model)
        norm = strategy.clip_gradients_norm(model, optimizer, max_norm=0.1)
        assert norm.ndim == 0 and torch.isfinite(norm)
        strategy.optimizer_step(optimizer)
        strategy.save_checkpoint(tmp_path / "sharded", {"model": model, "optimizer": optimizer})
        full_strategy = FSDPStrategy(state_dict_type="full")
        Connector(accelerator="cuda", strategy=full_strategy, devices=1).resolve()
        full_strategy.setup_environment()
        full_strategy.save_checkpoint(tmp_path / "full.pt", {"model": model})
        fresh = strategy.setup_module(Net())
        strategy.load_checkpoint(tmp_path / "sharded", {"model": fresh})
        for a, b in zip(model.parameters(), fresh.parameters()):
            assert torch.equal(full(a), full(b))
        saved = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
        assert all(value.device.type == "cpu" for value in saved.values())
        assert torch.equal(saved["out.weight"], full(model.out.weight).cpu())  # type: ignore[union-attr]
    finally:
        strategy.teardown()
