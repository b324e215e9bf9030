"""Sockets for DéjàVuLib's peers: the address model, listeners, and reading exact byte counts.

Address model: a listener *binds* one address (127.0.0.1 unless told; a wildcard only when asked)
and *advertises* the address its peers dial, which is the bind address unless given. A listener
bound to a wildcard must be told what to advertise: no one can dial 0.0.0.0.
"""
from __future__ import annotations

import socket
import threading
from typing import NamedTuple

LOOPBACK = "127.0.0.1"
WILDCARDS = ("", "0.0.0.0", "::")


class Address(NamedTuple):
    """Where peers reach a listener."""
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def advertised(bind: str, advertise: str | None = None) -> str:
    """The host peers are told to dial for a listener bound to `bind`."""
    if advertise:
        if advertise in WILDCARDS:
            raise ValueError(f"cannot advertise the wildcard address {advertise!r}: peers need one they can dial")
        return advertise
    if bind in WILDCARDS:
        raise ValueError(f"a listener bound to the wildcard address {bind or '*'!r} needs an advertised "
                         f"address (the one its peers reach this host at)")
    return bind


def listen(bind: str = LOOPBACK, port: int = 0) -> socket.socket:
    """A TCP listener on (bind, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    return socket.create_server((bind, port), family=family)


def parse_host_port(text: str) -> Address:
    """'HOST:PORT' or '[V6]:PORT' -> Address; ValueError naming what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return Address(host[1:-1] if host.startswith("[") and host.endswith("]") else host, int(port))


def route_address(host: str, port: int) -> str:
    """This host's local address on the route to (host, port): the address a connection to it
    would come from (a UDP connect sends nothing)."""
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        return s.getsockname()[0]


def serve_connections(listener: socket.socket, handler, name: str) -> None:
    """Accept on `listener` until it is closed; each connection is handled on a thread of its own."""
    def loop():
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:  # closed: stop
                return
            threading.Thread(target=handler, args=(sock,), daemon=True, name=f"{name}-conn").start()
    threading.Thread(target=loop, daemon=True, name=f"{name}-accept").start()


def recv_exact(sock: socket.socket, view: memoryview, peer: str = "peer") -> None:
    """Fill `view` from `sock`; ConnectionError when the peer closes first."""
    got = 0
    while got < len(view):
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError(f"{peer} closed the connection")
        got += k


def shutdown(sock: socket.socket) -> None:
    """Wake every thread blocked on `sock` (accept or recv): closing alone does not."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
