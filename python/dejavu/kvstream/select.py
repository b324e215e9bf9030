"""Which transport moves KV to a peer, by where the peer lives (overridable).

  same host, GPU             ipc   (CUDA IPC: the sender writes straight into the receiver's cache)
  same host, CPU             shm   (POSIX shared memory)
  other host                 tcp   (token-checked, checksummed; MPI and NCCL remain available to
                                    deployments launched that way)
`--kv-transport` (auto | ipc | shm | tcp) overrides the choice.
"""
from __future__ import annotations

import os
import socket

TRANSPORTS = ("auto", "ipc", "shm", "tcp")


def host_id() -> str:
    """This process's host as peers should compare it: the host name and the network namespace, so
    processes in two network namespaces of one machine (containers, test hosts) count as two hosts."""
    try:
        ns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()}/net:{ns}"


def same_host(peer_host: str, local_host: str | None = None) -> bool:
    local_host = local_host or socket.gethostname()
    return peer_host in (local_host, host_id(), "localhost", "127.0.0.1", "::1")


def choose(peer_host: str, override: str = "auto", local_host: str | None = None, device: str = "cpu") -> str:
    if override not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {override!r}; use one of {', '.join(TRANSPORTS)}")
    if override == "ipc" and device != "cuda":
        raise ValueError("KV transport 'ipc' (CUDA IPC) needs workers on CUDA devices")
    if override != "auto":
        return override
    if not same_host(peer_host, local_host):
        return "tcp"
    return "ipc" if device == "cuda" else "shm"
