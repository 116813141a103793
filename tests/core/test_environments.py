"""Cluster environments: every property from patched environment variables, the detection order and
its known misdetections, validate() messages, the SLURM host list and the LSF rankfile; plus real
checks: the free port takes a process group, and real torchrun workers detect themselves."""

from __future__ import annotations

import datetime
import importlib.machinery
import json
import os
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from tests.import_check import HEAVY, modules_loaded_by
from torchloom.core.environments import (
    DETECTION_ORDER,
    ClusterEnvironment,
    KubeflowEnvironment,
    LocalEnvironment,
    LSFEnvironment,
    MPIEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
    XLAEnvironment,
    detect_environment,
    expand_hostlist,
    find_free_port,
)
from torchloom.core.environments import mpi as mpi_module
from torchloom.core.environments import xla as xla_module
from torchloom.core.environments.lsf import read_rankfile_hosts
from torchloom.core.errors import ConfigurationError, MissingDependencyError, TorchloomError

_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "MV2_", "PET_", "LSB_", "JSM_", "TORCHELASTIC_")
_NAMES = (
    "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE",
    "LOCAL_WORLD_SIZE", "KUBERNETES_PORT", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "PJRT_DEVICE",
)  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with none of the variables any environment reads (CI may run under SLURM)."""
    for name in list(os.environ):
        if name in _NAMES or name.startswith(_PREFIXES):
            monkeypatch.delenv(name)


def setenv(monkeypatch: pytest.MonkeyPatch, **values: object) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, str(value))


# ---------------------------------------------------------------- Local


def test_local_defaults_and_setters() -> None:
    env = LocalEnvironment()
    assert env.name == "local"
    assert env.main_address == "127.0.0.1"
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (1, 0, 0, 0)
    assert env.creates_processes_externally is False
    env.set_world_size(8)
    env.set_global_rank(5)
    assert (env.world_size(), env.global_rank()) == (8, 5)


def test_local_reads_the_launcher_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    setenv(monkeypatch, MASTER_ADDR="10.0.0.7", MASTER_PORT=29512, LOCAL_RANK=3, GROUP_RANK=2)
    env = LocalEnvironment()
    assert (env.main_address, env.main_port, env.local_rank(), env.node_rank()) == ("10.0.0.7", 29512, 3, 2)
    assert env.creates_processes_externally is True  # LOCAL_RANK: a worker that already exists
    setenv(monkeypatch, NODE_RANK=1)
    assert env.node_rank() == 1  # NODE_RANK wins over GROUP_RANK


def test_local_free_port_is_free_stable_exported_and_forgotten_on_teardown() -> None:
    env = LocalEnvironment()
    port = env.main_port
    assert os.environ["MASTER_PORT"] == str(port)  # exported: the workers started next agree on it
    assert env.main_port == port
    assert LocalEnvironment().main_port == port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))  # nobody holds it
    env.teardown()
    assert "MASTER_PORT" not in os.environ


def test_local_teardown_keeps_a_user_port(monkeypatch: pytest.MonkeyPatch) -> None:
    setenv(monkeypatch, MASTER_PORT=29555)
    env = LocalEnvironment()
    assert env.main_port == 29555
    env.teardown()
    assert os.environ["MASTER_PORT"] == "29555"


def test_local_free_port_takes_a_real_process_group() -> None:
    import torch.distributed as dist

    env = LocalEnvironment()
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{env.main_address}:{env.main_port}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        assert dist.get_world_size() == 1
    finally:
        dist.destroy_process_group()
        env.teardown()


def test_find_free_port_gives_bindable_ports() -> None:
    for _ in range(3):
        port = find_free_port()
        assert 0 < port < 65536
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


@pytest.mark.parametrize(("value", "match"), [("abc", "MASTER_PORT='abc' is not an integer"), ("70000", "1-65535")])
def test_bad_port_names_the_value(monkeypatch: pytest.MonkeyPatch, value: str, match: str) -> None:
    setenv(monkeypatch, MASTER_PORT=value)
    with pytest.raises(ConfigurationError, match=match):
        _ = LocalEnvironment().main_port


def test_local_validate_multi_node(monkeypatch: pytest.MonkeyPatch) -> None:
    env = LocalEnvironment()
    env.validate(4, 1)
    with pytest.raises(ConfigurationError, match=r"num_nodes=2 .*MASTER_ADDR and MASTER_PORT.*NODE_RANK=<0..1>"):
        env.validate(1, 2)
    setenv(monkeypatch, MASTER_ADDR="node0", MASTER_PORT=29500, NODE_RANK=2)
    with pytest.raises(ConfigurationError, match=r"NODE_RANK=2 is out of range for num_nodes=2"):
        env.validate(1, 2)
    setenv(monkeypatch, NODE_RANK=1)
    env.validate(1, 2)


# ---------------------------------------------------------------- torchrun


def _torchrun(monkeypatch: pytest.MonkeyPatch, **extra: object) -> None:
    values: dict[str, object] = {
        "TORCHELASTIC_RUN_ID": "job1", "RANK": 5, "LOCAL_RANK": 1, "WORLD_SIZE": 8, "LOCAL_WORLD_SIZE": 4,
        "GROUP_RANK": 1, "MASTER_ADDR": "host0", "MASTER_PORT": 29400,
    }  # fmt: skip
    setenv(monkeypatch, **{**values, **extra})


def test_torchelastic_properties(monkeypatch: pytest.MonkeyPatch) -> None:
    _torchrun(monkeypatch)
    env = TorchElasticEnvironment()
    assert TorchElasticEnvironment.detect()
    assert env.creates_processes_externally is True
    assert (env.main_address, env.main_port) == ("host0", 29400)
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (8, 5, 1, 1)
    env.set_world_size(2)  # the scheduler's numbers win
    assert env.world_size() == 8
    env.validate(4, 2)


def test_torchelastic_detect_matches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    assert not TorchElasticEnvironment.detect() and not dist.is_torchelastic_launched()
    setenv(monkeypatch, TORCHELASTIC_RUN_ID="job1")
    assert dist.is_torchelastic_launched()
    assert not TorchElasticEnvironment.detect()  # the agent itself: no worker rank yet
    setenv(monkeypatch, RANK=0, LOCAL_RANK=0, WORLD_SIZE=1)
    assert TorchElasticEnvironment.detect()


def test_torchelastic_validate_names_values_and_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    _torchrun(monkeypatch)
    env = TorchElasticEnvironment()
    with pytest.raises(
        ConfigurationError, match=r"WORLD_SIZE=8 .*devices=2 x num_nodes=1 = 2.*devices=4 and num_nodes=2"
    ):
        env.validate(2, 1)
    with pytest.raises(ConfigurationError, match=r"LOCAL_WORLD_SIZE=4 .*devices=8.*--nproc-per-node=8"):
        env.validate(8, 1)  # 8 x 1 == WORLD_SIZE, but each node runs 4


def test_torchelastic_without_master_addr(monkeypatch: pytest.MonkeyPatch) -> None:
    _torchrun(monkeypatch)
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(ConfigurationError, match="MASTER_ADDR"):
        _ = TorchElasticEnvironment().main_address


_WORKER = """
import json, os, sys
from torchloom.core.environments import detect_environment
env = detect_environment()
record = dict(name=env.name, world=env.world_size(), rank=env.global_rank(), local=env.local_rank(),
              node=env.node_rank(), addr=env.main_address, port=env.main_port, external=env.creates_processes_externally,
              torch_imported="torch" in sys.modules)
env.validate(2, 1)
with open(os.path.join(sys.argv[1], f"rank{env.global_rank()}.json"), "w") as f:
    json.dump(record, f)
"""


@pytest.mark.slow
def test_real_torchrun_workers_detect_torchelastic(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = find_free_port()
    env = {k: v for k, v in os.environ.items() if not (k in _NAMES or k.startswith(_PREFIXES))}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={port}", str(script), str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, record in enumerate(records):
        assert record == {"name": "torchelastic", "world": 2, "rank": rank, "local": rank, "node": 0,
                          "addr": "127.0.0.1", "port": port, "external": True, "torch_imported": False}  # fmt: skip


# ---------------------------------------------------------------- SLURM


def _srun_task(monkeypatch: pytest.MonkeyPatch, **extra: object) -> None:
    values: dict[str, object] = {
        "SLURM_NTASKS": 8, "SLURM_PROCID": 5, "SLURM_LOCALID": 1, "SLURM_NODEID": 1, "SLURM_STEP_ID": 0,
        "SLURM_NODELIST": "node[01-02]", "SLURM_JOB_ID": 123456, "SLURM_JOB_NAME": "train", "SLURM_NNODES": 2,
        "SLURM_NTASKS_PER_NODE": 4,
    }  # fmt: skip
    setenv(monkeypatch, **{**values, **extra})


def test_slurm_properties(monkeypatch: pytest.MonkeyPatch) -> None:
    _srun_task(monkeypatch)
    env = SLURMEnvironment()
    assert SLURMEnvironment.detect()
    assert env.creates_processes_externally is True
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (8, 5, 1, 1)
    assert env.main_address == "node01"
    assert env.main_port == 12000 + 123456 % 20000
    assert env.job_id == "123456"
    env.validate(4, 2)
    setenv(monkeypatch, SLURM_STEP_NODELIST="gpu[7-8]")
    assert env.main_address == "gpu7"  # the step's nodes, where rank 0 runs
    setenv(monkeypatch, MASTER_ADDR="10.1.1.1", MASTER_PORT=40000, SLURM_ARRAY_JOB_ID=99, SLURM_ARRAY_TASK_ID=3)
    assert (env.main_address, env.main_port, env.job_id) == ("10.1.1.1", 40000, "99_3")


def test_slurm_requeue_arguments_are_kept() -> None:
    assert SLURMEnvironment().auto_requeue is True
    assert SLURMEnvironment().requeue_signal == getattr(signal, "SIGUSR1", None)
    env = SLURMEnvironment(auto_requeue=False, requeue_signal=signal.SIGTERM)
    assert (env.auto_requeue, env.requeue_signal) == (False, signal.SIGTERM)


_BATCH = {"SLURM_NTASKS": 4, "SLURM_PROCID": 0, "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": 7}


@pytest.mark.parametrize(
    ("case", "values", "expected"),
    [
        ("srun task of a batch job", {**_BATCH, "SLURM_STEP_ID": 0}, True),
        ("single srun task", {**_BATCH, "SLURM_NTASKS": 1, "SLURM_STEP_ID": 0}, True),
        ("legacy SLURM_STEPID", {**_BATCH, "SLURM_STEPID": 2}, True),
        ("batch script without srun", _BATCH, False),
        ("batch step id", {**_BATCH, "SLURM_STEP_ID": 4294967294}, False),
        ("interactive step (salloc)", {**_BATCH, "SLURM_STEP_ID": 4294967290, "SLURM_JOB_NAME": "interactive"}, False),
        ("srun --pty bash", {**_BATCH, "SLURM_NTASKS": 1, "SLURM_STEP_ID": 0, "SLURM_JOB_NAME": "bash"}, False),
        ("job named interactive", {**_BATCH, "SLURM_NTASKS": 1, "SLURM_STEP_ID": 0, "SLURM_JOB_NAME": "Interactive"}, False),
        ("pseudo-terminal", {**_BATCH, "SLURM_NTASKS": 1, "SLURM_STEP_ID": 0, "SLURM_PTY_PORT": 4242}, False),
        ("srun -n 4 inside an salloc shell", {**_BATCH, "SLURM_STEP_ID": 1, "SLURM_JOB_NAME": "interactive"}, True),
        ("mpirun inside an allocation", {**_BATCH, "SLURM_NTASKS": 2, "SLURM_PROCID": 1, "SLURM_STEP_ID": 0,
                                         "OMPI_COMM_WORLD_SIZE": 8, "OMPI_COMM_WORLD_RANK": 5}, False),
        ("srun --mpi=pmi2", {**_BATCH, "SLURM_PROCID": 2, "SLURM_STEP_ID": 0, "PMI_SIZE": 4, "PMI_RANK": 2}, True),
        ("no SLURM_NTASKS", {"SLURM_JOB_ID": 7, "SLURM_PROCID": 0, "SLURM_STEP_ID": 0}, False),
        ("garbled step id", {**_BATCH, "SLURM_STEP_ID": "x"}, False),
    ],
)  # fmt: skip
def test_slurm_detect(monkeypatch: pytest.MonkeyPatch, case: str, values: dict[str, object], expected: bool) -> None:
    setenv(monkeypatch, **values)
    assert SLURMEnvironment.detect() is expected, case


def test_slurm_validate_names_values_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    _srun_task(monkeypatch)
    env = SLURMEnvironment()
    with pytest.raises(
        ConfigurationError, match=r"SLURM_NTASKS_PER_NODE=4 .*devices=2.*--ntasks-per-node=2.*devices=4"
    ):
        env.validate(2, 2)
    with pytest.raises(ConfigurationError, match=r"SLURM_NNODES=2 .*num_nodes=1.*--nodes=1.*num_nodes=2"):
        env.validate(4, 1)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")  # only --ntasks given
    monkeypatch.delenv("SLURM_NNODES")
    with pytest.raises(ConfigurationError, match=r"SLURM_NTASKS=8 .*devices=2 x num_nodes=2 = 4.*--ntasks-per-node=2"):
        env.validate(2, 2)
    env.validate(4, 2)


def test_slurm_needs_a_node_list_or_master_addr(monkeypatch: pytest.MonkeyPatch) -> None:
    _srun_task(monkeypatch)
    monkeypatch.delenv("SLURM_NODELIST")
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(ConfigurationError, match="MASTER_ADDR"):
        _ = SLURMEnvironment().main_address
    with pytest.raises(ConfigurationError, match="MASTER_PORT"):
        _ = SLURMEnvironment().main_port


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("node01", ["node01"]),
        ("node[01-04,07],gpu3", ["node01", "node02", "node03", "node04", "node07", "gpu3"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("a, b ,c", ["a", "b", "c"]),
        ("gpu-[3]", ["gpu-3"]),
        ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
        ("node[001-002].cluster.org,login", ["node001.cluster.org", "node002.cluster.org", "login"]),
        ("x[9-11]y", ["x9y", "x10y", "x11y"]),
    ],
)
def test_expand_hostlist(hostlist: str, hosts: list[str]) -> None:
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["", " , ", "n[1-", "n]1[", "n[a-b]", "n[3-1]", "n[[1]]", "n[]", "n[1-2-3]"])
def test_expand_hostlist_rejects_garbage(hostlist: str) -> None:
    with pytest.raises(ConfigurationError, match="SLURM host list"):
        expand_hostlist(hostlist)


# ---------------------------------------------------------------- MPI

_FAMILIES = {
    "Open MPI": (
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    "PMI": ("PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    "MVAPICH2": (
        "MV2_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_RANK",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_SIZE",
    ),
}


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_mpi_properties_per_launcher_family(monkeypatch: pytest.MonkeyPatch, family: str) -> None:
    size, rank, local_rank, local_size = _FAMILIES[family]
    setenv(monkeypatch, **{size: 8, rank: 6, local_rank: 2, local_size: 4}, MASTER_ADDR="head", MASTER_PORT=29501)
    env = MPIEnvironment()
    assert MPIEnvironment.detect()
    assert env.creates_processes_externally is True
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (8, 6, 2, 1)
    assert (env.main_address, env.main_port) == ("head", 29501)
    env.validate(4, 2)
    with pytest.raises(ConfigurationError, match=rf"{family} started {size}=8 .*devices=2 x num_nodes=2 = 4.*-np 4"):
        env.validate(2, 2)
    with pytest.raises(ConfigurationError, match=rf"{local_size}=4 .*devices=8.*--npernode 8"):
        env.validate(8, 1)


def test_mpi_detect_needs_more_than_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not MPIEnvironment.detect()
    setenv(monkeypatch, OMPI_COMM_WORLD_SIZE=1, OMPI_COMM_WORLD_RANK=0)
    assert not MPIEnvironment.detect()  # mpirun -np 1: torchloom may start the workers itself
    setenv(monkeypatch, OMPI_COMM_WORLD_SIZE=2)
    assert MPIEnvironment.detect()


def test_mpi_without_master_addr_or_mpi4py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mpi_module, "is_available", lambda module: False)
    setenv(monkeypatch, PMI_SIZE=2, PMI_RANK=1)
    env = MPIEnvironment()
    with pytest.raises(ConfigurationError, match=r"main address \(MASTER_ADDR is not set\).*pip install mpi4py"):
        _ = env.main_address
    with pytest.raises(ConfigurationError, match=r"local rank \(MPI_LOCALRANKID is not set\)"):
        env.local_rank()
    setenv(monkeypatch, MASTER_ADDR="head")
    assert env.main_port == 29500  # all ranks agree on the customary port


class _FakeComm:
    """The mpi4py communicator methods MPIEnvironment calls, answering as rank ``rank`` would."""

    def __init__(self, rank: int, size: int, root_value: object = None, node: tuple[int, int] = (0, 1)) -> None:
        self.rank, self.size, self.root_value, self.node = rank, size, root_value, node
        self.calls: list[str] = []

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.size

    def bcast(self, value: object, root: int = 0) -> object:
        self.calls.append("bcast")
        return value if self.rank == root else self.root_value

    def Split_type(self, split_type: int) -> _FakeComm:
        self.calls.append("split")
        return _FakeComm(*self.node, node=self.node)


def _install_fake_mpi4py(monkeypatch: pytest.MonkeyPatch, comm: _FakeComm) -> None:
    package = types.ModuleType("mpi4py")
    package.__spec__ = importlib.machinery.ModuleSpec("mpi4py", None)
    package.MPI = types.SimpleNamespace(COMM_WORLD=comm, COMM_TYPE_SHARED=1)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mpi4py", package)


def test_mpi_broadcasts_main_address_from_rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    setenv(monkeypatch, OMPI_COMM_WORLD_SIZE=2, OMPI_COMM_WORLD_RANK=0)
    comm = _FakeComm(rank=0, size=2)
    _install_fake_mpi4py(monkeypatch, comm)
    env = MPIEnvironment()
    assert env.main_address == socket.gethostname()
    port = env.main_port
    with socket.socket() as sock:
        sock.bind(("", port))  # rank 0 chose a port that is free on its host
    assert comm.calls == ["bcast"]  # asked once, cached

    comm = _FakeComm(rank=1, size=2, root_value=("node-a", 31313), node=(1, 2))
    _install_fake_mpi4py(monkeypatch, comm)
    setenv(monkeypatch, OMPI_COMM_WORLD_RANK=1)
    env = MPIEnvironment()
    assert (env.main_address, env.main_port) == ("node-a", 31313)
    assert (env.local_rank(), env.node_rank()) == (1, 0)  # from the per-node communicator (rank 1 // size 2)
    assert comm.calls == ["bcast", "split"]


# ---------------------------------------------------------------- Kubeflow


def _pod(monkeypatch: pytest.MonkeyPatch, **extra: object) -> None:
    values: dict[str, object] = {
        "KUBERNETES_PORT": "tcp://10.96.0.1:443", "MASTER_ADDR": "job-master-0", "MASTER_PORT": 23456,
        "WORLD_SIZE": 3, "RANK": 2,
    }  # fmt: skip
    setenv(monkeypatch, **{**values, **extra})


def test_kubeflow_one_process_per_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    _pod(monkeypatch)
    env = KubeflowEnvironment()
    assert KubeflowEnvironment.detect()
    assert env.creates_processes_externally is False
    assert (env.main_address, env.main_port) == ("job-master-0", 23456)
    env.validate(1, 3)
    assert (env.num_pods(), env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (3, 3, 2, 0, 2)


def test_kubeflow_several_devices_per_pod_multiply_the_world(monkeypatch: pytest.MonkeyPatch) -> None:
    _pod(monkeypatch)
    env = KubeflowEnvironment()
    env.validate(4, 3)  # WORLD_SIZE=3 counts pods, not processes
    assert (env.world_size(), env.global_rank(), env.node_rank()) == (12, 8, 2)
    env.set_world_size(12)
    env.set_global_rank(9)
    assert (env.world_size(), env.global_rank()) == (12, 9)


def test_kubeflow_newer_operator_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    _pod(monkeypatch, WORLD_SIZE=8, RANK=1, PET_NPROC_PER_NODE=4, PET_NODE_RANK=1)
    env = KubeflowEnvironment()
    assert env.num_pods() == 2  # WORLD_SIZE is pods x nprocPerNode there
    setenv(monkeypatch, PET_NNODES=2, WORLD_SIZE=999)
    assert env.num_pods() == 2  # PET_NNODES wins
    env.validate(4, 2)
    assert (env.world_size(), env.global_rank(), env.node_rank()) == (8, 4, 1)
    setenv(monkeypatch, PET_NNODES="1:4", PET_NPROC_PER_NODE="auto", WORLD_SIZE=3)
    assert env.num_pods() == 3  # elastic range and "auto" say nothing exact


def test_kubeflow_validate_names_pods_and_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    _pod(monkeypatch)
    with pytest.raises(ConfigurationError, match=r"runs 3 pods .*num_nodes=1.*Pass num_nodes=3"):
        KubeflowEnvironment().validate(2, 1)
    setenv(monkeypatch, RANK=5)
    with pytest.raises(ConfigurationError, match=r"pod index 5 .*3 pods"):
        KubeflowEnvironment().validate(2, 3)


@pytest.mark.parametrize(
    ("extra", "missing"),
    [({"TORCHELASTIC_RUN_ID": "x"}, None), ({"LOCAL_RANK": 1}, None), ({}, "RANK"), ({}, "KUBERNETES_PORT")],
)
def test_kubeflow_detect_only_for_a_plain_pod(
    monkeypatch: pytest.MonkeyPatch, extra: dict[str, object], missing: str | None
) -> None:
    _pod(monkeypatch, **extra)
    if missing:
        monkeypatch.delenv(missing)
    assert not KubeflowEnvironment.detect()


def test_kubeflow_worker_started_by_torchloom_is_local(monkeypatch: pytest.MonkeyPatch) -> None:
    # what a pod's worker 3 sees: the operator's variables plus what torchloom's launcher exported
    _pod(monkeypatch, LOCAL_RANK=3, NODE_RANK=2)
    env = detect_environment()
    assert isinstance(env, LocalEnvironment)
    assert (env.local_rank(), env.node_rank(), env.main_address, env.creates_processes_externally) == (
        3, 2, "job-master-0", True
    )  # fmt: skip
    explicit = KubeflowEnvironment()  # passed as a plugin instead: same answers, and no re-validation
    explicit.validate(4, 99)
    assert (explicit.local_rank(), explicit.node_rank(), explicit.creates_processes_externally) == (3, 2, True)


# ---------------------------------------------------------------- LSF


def _rankfile(tmp_path: Path, text: str = "batch1\nh1\nh1\n\nh2.cluster.org\nh2.cluster.org\n") -> Path:
    path = tmp_path / "rankfile"
    path.write_text(text)
    return path


def _jsrun(monkeypatch: pytest.MonkeyPatch, rankfile: Path, **extra: object) -> None:
    values: dict[str, object] = {
        "LSB_JOBID": 4711, "LSB_DJOB_RANKFILE": rankfile, "JSM_NAMESPACE_SIZE": 4, "JSM_NAMESPACE_RANK": 3,
        "JSM_NAMESPACE_LOCAL_RANK": 1,
    }  # fmt: skip
    setenv(monkeypatch, **{**values, **extra})


def test_lsf_rankfile_parsing(tmp_path: Path) -> None:
    assert read_rankfile_hosts(_rankfile(tmp_path)) == ["h1", "h2.cluster.org"]
    with pytest.raises(ConfigurationError, match="lists no compute host after the launch host"):
        read_rankfile_hosts(_rankfile(tmp_path, "batch1\n"))
    with pytest.raises(ConfigurationError, match="missing"):
        read_rankfile_hosts(tmp_path / "missing")


def test_lsf_properties(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _jsrun(monkeypatch, _rankfile(tmp_path))
    monkeypatch.setattr(socket, "gethostname", lambda: "h2")
    env = LSFEnvironment()
    assert LSFEnvironment.detect()
    assert env.creates_processes_externally is True
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (4, 3, 1, 1)
    assert (env.main_address, env.main_port) == ("h1", 12000 + 4711)
    env.validate(2, 2)
    setenv(monkeypatch, MASTER_ADDR="h9", MASTER_PORT=30001)
    assert (env.main_address, env.main_port) == ("h9", 30001)
    monkeypatch.setattr(socket, "gethostname", lambda: "h1.cluster.org")
    assert env.node_rank() == 0
    monkeypatch.setattr(socket, "gethostname", lambda: "elsewhere")
    with pytest.raises(ConfigurationError, match=r"'elsewhere' is not among .*'h1', 'h2.cluster.org'"):
        env.node_rank()


def test_lsf_detect_and_validate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _jsrun(monkeypatch, _rankfile(tmp_path))
    monkeypatch.delenv("JSM_NAMESPACE_LOCAL_RANK")
    assert not LSFEnvironment.detect()
    env = LSFEnvironment()
    with pytest.raises(ConfigurationError, match=r"2 compute hosts \(h1, h2.cluster.org\), but num_nodes=1"):
        env.validate(4, 1)
    with pytest.raises(
        ConfigurationError, match=r"JSM_NAMESPACE_SIZE=4 .*devices=4 x num_nodes=2 = 8.*--tasks_per_rs 4"
    ):
        env.validate(4, 2)


# ---------------------------------------------------------------- XLA


def _install_fake_torch_xla(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch-xla's runtime answers for process 3 of 8 on host 1 (the device query layer, patched)."""
    package = types.ModuleType("torch_xla")
    package.__spec__ = importlib.machinery.ModuleSpec("torch_xla", None, is_package=True)
    package.__path__ = []
    runtime: Any = types.ModuleType("torch_xla.runtime")
    runtime.__spec__ = importlib.machinery.ModuleSpec("torch_xla.runtime", None)
    runtime.world_size, runtime.global_ordinal = lambda: 8, lambda: 3
    runtime.local_ordinal, runtime.host_index = lambda: 3, lambda: 1
    package.runtime = runtime  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_xla", package)
    monkeypatch.setitem(sys.modules, "torch_xla.runtime", runtime)


def test_xla_reads_the_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_torch_xla(monkeypatch)
    env = XLAEnvironment()
    assert not XLAEnvironment.detect()
    setenv(monkeypatch, PJRT_DEVICE="TPU")
    assert XLAEnvironment.detect()
    assert env.creates_processes_externally is False
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (8, 3, 3, 1)
    with pytest.raises(TorchloomError, match="xla://"):
        _ = env.main_address
    with pytest.raises(TorchloomError, match="xla://"):
        _ = env.main_port


def test_xla_without_torch_xla(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_xla", None)  # as if not installed
    setenv(monkeypatch, PJRT_DEVICE="TPU")
    assert not XLAEnvironment.detect()
    with pytest.raises(MissingDependencyError, match=r"torchloom-core\[xla\]"):
        XLAEnvironment().world_size()
    assert xla_module.XLAEnvironment is XLAEnvironment


# ---------------------------------------------------------------- detection order


@pytest.mark.parametrize(
    ("case", "values", "expected"),
    [
        ("nothing", {}, LocalEnvironment),
        ("srun step", {**_BATCH, "SLURM_STEP_ID": 0, "SLURM_PROCID": 0}, SLURMEnvironment),
        ("torchrun inside an sbatch job", {**_BATCH, "SLURM_STEP_ID": 0, "TORCHELASTIC_RUN_ID": "r", "RANK": 3,
                                           "LOCAL_RANK": 3, "WORLD_SIZE": 8}, TorchElasticEnvironment),
        ("SLURM interactive shell", {**_BATCH, "SLURM_NTASKS": 1, "SLURM_STEP_ID": 0, "SLURM_JOB_NAME": "bash"},
         LocalEnvironment),
        ("SLURM batch script without srun", _BATCH, LocalEnvironment),
        ("jsrun (Spectrum MPI exports OMPI too)", {"LSB_JOBID": 1, "LSB_DJOB_RANKFILE": "/x", "JSM_NAMESPACE_SIZE": 2,
                                                   "JSM_NAMESPACE_RANK": 0, "JSM_NAMESPACE_LOCAL_RANK": 0,
                                                   "OMPI_COMM_WORLD_SIZE": 2}, LSFEnvironment),
        ("mpirun", {"OMPI_COMM_WORLD_SIZE": 2, "OMPI_COMM_WORLD_RANK": 1}, MPIEnvironment),
        ("mpirun inside an salloc allocation", {**_BATCH, "SLURM_NTASKS": 1, "SLURM_STEP_ID": 0,
                                                "OMPI_COMM_WORLD_SIZE": 4, "OMPI_COMM_WORLD_RANK": 0}, MPIEnvironment),
        ("Kubeflow pod", {"KUBERNETES_PORT": "tcp://x:443", "MASTER_ADDR": "m", "MASTER_PORT": 1, "WORLD_SIZE": 2,
                          "RANK": 1}, KubeflowEnvironment),
        ("torchrun in a Kubeflow pod", {"KUBERNETES_PORT": "tcp://x:443", "MASTER_ADDR": "m", "MASTER_PORT": 1,
                                        "WORLD_SIZE": 4, "RANK": 1, "LOCAL_RANK": 1, "TORCHELASTIC_RUN_ID": "r"},
         TorchElasticEnvironment),
        ("any Kubernetes pod (a notebook)", {"KUBERNETES_PORT": "tcp://x:443"}, LocalEnvironment),
        ("TPU host: XLA is never auto-detected", {"PJRT_DEVICE": "TPU"}, LocalEnvironment),
    ],
)  # fmt: skip
def test_detect_environment(
    monkeypatch: pytest.MonkeyPatch, case: str, values: dict[str, object], expected: type[ClusterEnvironment]
) -> None:
    _install_fake_torch_xla(monkeypatch)
    setenv(monkeypatch, **values)
    assert type(detect_environment()) is expected, case


def test_every_environment_has_a_distinct_name() -> None:
    classes: list[type[ClusterEnvironment]] = [*DETECTION_ORDER, LocalEnvironment, XLAEnvironment]
    names = [cls.name for cls in classes]
    assert names == ["torchelastic", "slurm", "lsf", "mpi", "kubeflow", "local", "xla"]


def test_environments_import_is_cheap() -> None:
    loaded = modules_loaded_by("import torchloom.core.environments")
    assert not loaded & {*HEAVY, "torch", "mpi4py", "numpy"}, sorted(loaded & {*HEAVY, "torch", "mpi4py", "numpy"})
