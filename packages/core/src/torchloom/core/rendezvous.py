"""The store a process group meets through: on a loopback main address, rank 0 listens on loopback only.

torch's ``TCPStore`` server listens on every interface of the machine, whatever address the ranks
connect to, so a single-machine job would accept connections from the network. When the main address
is a loopback one (the default, ``127.0.0.1``), rank 0 binds the listening socket itself to that
address and hands it to the store (``master_listen_fd``). Any other address is the user's choice of
a reachable node: torch's own server is used. Workers under torch elastic's agent join the agent's store.

torch elastic's agent (``torchloom run``, the ``popen`` launcher) creates that store itself, with torch's
server. ``host_agent_store`` hosts the loopback-only server in the agent's process first: the agent's
store is created ``multi_tenant``, so it shares the server already listening on that port instead of
opening one on every interface.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket

from torch._C._distributed_c10d import TCPStore  # torch.distributed re-exports it, but not for type checkers

__all__ = ["host_agent_store", "is_loopback", "tcp_store"]

_hosted: dict[tuple[str, int], TCPStore] = {}  # loopback servers of this process, reused on re-init


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def tcp_store(address: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta) -> TCPStore:
    """The rendezvous store at ``address:port``: hosted by rank 0 (loopback-only on a loopback address), joined by the others."""
    hosts = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    if not hosts:
        return TCPStore(address, port, world_size, False, timeout)
    if not is_loopback(address):
        return TCPStore(address, port, world_size, True, timeout, multi_tenant=True)
    store = _hosted.get((address, port))
    if store is None:  # a later group in this process meets in the same store (keys are prefixed per group)
        store = _hosted[(address, port)] = _loopback_server(address, port, world_size, timeout)
    return store


def host_agent_store(address: str, port: int, timeout: datetime.timedelta) -> TCPStore | None:
    """In the process of torch elastic's node-0 agent, before it starts: the loopback-only server its store will
    share (``None`` for another address: torch's server is the user's choice of a reachable node).

    ``port=0``: the kernel picks a free one (no race with other jobs); ``store.port`` tells which."""
    if not is_loopback(address):
        return None
    store = _hosted.get((address, port)) if port else None
    if store is None:
        store = _loopback_server(address, port, None, timeout)
        _hosted[(address, store.port)] = store
    return store


def _loopback_server(address: str, port: int, world_size: int | None, timeout: datetime.timedelta) -> TCPStore:
    host = address.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(1024)
    except OSError:
        listener.close()
        raise
    # the store owns the socket from here on: detach it, so Python never closes it under the server
    # multi_tenant: later stores of this process on this port (torch elastic's agent's) share this server
    return TCPStore(
        host,
        port,
        world_size,
        True,
        timeout,
        wait_for_workers=False,
        multi_tenant=True,
        master_listen_fd=listener.detach(),
    )
