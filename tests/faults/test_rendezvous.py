"""The rendezvous store listens on loopback only when the main address is loopback (torch's listens everywhere)."""

from __future__ import annotations

import datetime
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.processes import job_env
from torchloom.core import distributed
from torchloom.core.environments.local import find_free_port
from torchloom.core.rendezvous import is_loopback

TIMEOUT = datetime.timedelta(seconds=30)


def listening_addresses(port: int) -> list[str]:
    """The local addresses with a socket listening on ``port``, from /proc/net/tcp{,6} (no tools needed)."""
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if width == 8:
                    found.append(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.append(socket.inet_ntop(socket.AF_INET6, words))
    return found


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("10.0.0.5", False), ("node-0.cluster", False), ("::", False)],
)  # fmt: skip
def test_loopback_addresses_are_recognised(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_one_rank_store_listens_on_loopback_only_and_is_reused_on_reinit() -> None:
    port = find_free_port()
    try:
        for _ in range(2):  # a second group in this process meets in the same store, still loopback-only
            distributed.init_process_group("gloo", rank=0, world_size=1, timeout=TIMEOUT, main_address="127.0.0.1",
                                           main_port=port)  # fmt: skip
            assert listening_addresses(port) == ["127.0.0.1"]
            assert distributed.all_reduce(torch.ones(1), reduce_op="sum").item() == 1
            distributed.destroy_process_group()
    finally:
        if dist.is_initialized():
            distributed.destroy_process_group()


def _two_ranks(rank: int, port: int, out: str) -> None:
    distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=TIMEOUT, main_address="127.0.0.1",
                                   main_port=port)  # fmt: skip
    total = distributed.all_reduce(torch.tensor([rank + 1.0]), reduce_op="sum").item()
    if rank == 0:
        Path(out).write_text(f"{total} {','.join(listening_addresses(port))}")
    distributed.barrier()
    distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_meet_through_a_loopback_only_store(tmp_path: Path) -> None:
    port = find_free_port()
    out = tmp_path / "result.txt"
    # spawn: a forked child would inherit this process's store and gloo threads (the test above made some)
    mp.start_processes(_two_ranks, args=(port, str(out)), nprocs=2, start_method="spawn")
    total, addresses = out.read_text().split()
    assert float(total) == 3.0
    assert addresses == "127.0.0.1"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torchloom run", "popen launcher"])
def test_the_elastic_agents_store_listens_on_loopback_only(tmp_path: Path, how: str) -> None:
    """torch elastic's agent (``torchloom run``, the ``ddp`` popen launcher) shares the loopback-only server
    hosted in its process instead of opening one on every interface."""
    out = tmp_path / "addresses.txt"
    worker = Path(__file__).with_name("agent_store_worker.py")
    if how == "torchloom run":
        command = [sys.executable, "-m", "torchloom.fabric.cli", "run", "--devices", "2", str(worker), str(out)]
    else:
        command = [sys.executable, str(worker), str(out), "launcher"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=120, env=job_env())
    assert process.returncode == 0, process.stderr[-3000:]
    assert out.read_text() == "127.0.0.1"
