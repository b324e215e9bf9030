"""What the HTTP server allows a client: how many connections at once, how long to send request
headers and a body, how large a body, how long shutdown waits.

aiohttp bounds header lines and body size itself (`client_max_size`) and closes a connection whose
request has not arrived `keepalive_timeout` seconds after it opened or after its last response
(that covers both idle keep-alive connections and headers sent too slowly). It has no cap on
connections: CappedSite answers those beyond the cap with a 503 and closes them at once, before
any HTTP parsing, so idle or slow connections cannot use up the process's file descriptors.
"""
from __future__ import annotations

import asyncio
import json
import resource
import socket
from dataclasses import dataclass

from aiohttp import web

from ..config import check_positive


def bind_listener(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (the first address the host resolves to), not yet listening:
    `dejavu serve` takes its port before loading a model, so a taken port fails in a second.
    ValueError naming the address when it cannot be bound."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server does
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def default_max_connections() -> int:
    """1024, or half the process's file-descriptor limit when that is lower (the rest is left
    for the engine, its workers' channels, the model files)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft // 2))


@dataclass
class HttpLimits:
    max_connections: int = 0          # 0: default_max_connections()
    header_timeout: float = 15.0      # s: request headers after connecting, or idle between requests
    body_timeout: float = 30.0        # s: the whole body once its headers are in (408 past it)
    max_body_bytes: int = 8 << 20     # larger bodies get 413
    shutdown_timeout: float = 3.0     # s: what runs is cancelled first; this bounds the rest

    def __post_init__(self):
        if not self.max_connections:
            self.max_connections = default_max_connections()
        for name in ("max_connections", "header_timeout", "body_timeout", "max_body_bytes", "shutdown_timeout"):
            check_positive(name, getattr(self, name))


def _refusal(max_connections: int) -> bytes:
    body = json.dumps({"error": {"message": f"too many connections (at most {max_connections}); retry later",
                                 "type": "server_error", "param": None, "code": 503}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Retry-After: 1\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


class _Refuse(asyncio.Protocol):
    """A connection over the cap: one 503, then closed."""

    def __init__(self, response: bytes):
        self.response = response

    def connection_made(self, transport):
        transport.write(self.response)
        transport.close()


class _Counted(asyncio.Protocol):
    """aiohttp's handler for one connection, counted as open until the connection is lost."""

    def __init__(self, inner: asyncio.Protocol, site: "CappedSite"):
        self.inner, self.site = inner, site
        site.open += 1

    def connection_made(self, transport):
        self.inner.connection_made(transport)

    def data_received(self, data):
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def pause_writing(self):
        self.inner.pause_writing()

    def resume_writing(self):
        self.inner.resume_writing()

    def connection_lost(self, exc):
        self.site.open -= 1
        self.inner.connection_lost(exc)


class CappedSite(web.BaseSite):
    """A TCP site that serves at most `max_connections` connections at once; one beyond that is
    answered with a 503 and closed, and counted by `on_refuse()`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, max_connections: int, on_refuse=None,
                 backlog: int = 128, sock: socket.socket | None = None):
        super().__init__(runner, backlog=backlog)
        self.host, self.port, self.max_connections = host, port, max_connections
        self.sock = sock  # already bound (bind_listener); else host:port is bound at start
        self.on_refuse = on_refuse
        self.open = 0  # connections being served
        self._refusal = _refusal(max_connections)

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None

        def protocol():
            if self.open >= self.max_connections:
                if self.on_refuse is not None:
                    self.on_refuse()
                return _Refuse(self._refusal)
            return _Counted(server(), self)
        where = dict(sock=self.sock) if self.sock is not None else dict(host=self.host, port=self.port,
                                                                           reuse_address=True)
        self._server = await asyncio.get_running_loop().create_server(protocol, backlog=self._backlog, **where)
        self.port = self._server.sockets[0].getsockname()[1]
