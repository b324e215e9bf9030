"""Which transport moves KV to a peer, by where the peer lives (overridable).

  same host, any device      shm   (POSIX shared memory; the GPU side stages through the pinned pool)
  other host                 tcp   (token-checked, checksummed; MPI and NCCL remain available to
                                    deployments launched that way)
`--kv-transport` (auto | shm | tcp) overrides the choice.
"""
from __future__ import annotations

import socket

TRANSPORTS = ("auto", "shm", "tcp")


def same_host(peer_host: str, local_host: str | None = None) -> bool:
    local_host = local_host or socket.gethostname()
    return peer_host in (local_host, "localhost", "127.0.0.1", "::1")


def choose(peer_host: str, override: str = "auto", local_host: str | None = None) -> str:
    if override not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {override!r}; use one of {', '.join(TRANSPORTS)}")
    if override != "auto":
        return override
    return "shm" if same_host(peer_host, local_host) else "tcp"
