"""The control channel: typed messages (cluster/messages.py) in length-prefixed frames over TCP,
opened by a HELLO that carries the cluster token (the controller's side of it: auth.py). Never pickle.

Frame: 4-byte big-endian payload length, then a msgpack map with a "t" (kind) field. Frames over
MAX_FRAME bytes, non-map payloads, undecodable bytes and messages that are not a known kind with
well-typed fields are protocol errors that close the connection with a message naming the problem.
"""
from __future__ import annotations

import socket
import struct
import threading
import time

import msgpack

from ..kvstream.net import recv_exact, serve_connections  # noqa: F401 - re-exported

MAX_FRAME = 64 << 20
_LEN = struct.Struct(">I")


class ProtocolError(ConnectionError):
    pass


class Channel:
    def __init__(self, sock: socket.socket, peer: str = ""):
        self.sock = sock
        self.peer = peer or str(sock.getpeername())
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send_lock = threading.Lock()  # heartbeats and replication acks send from their own threads
        self.stamp = None  # () -> the sender's cluster epoch, which every message sent then carries

    def send(self, msg) -> None:
        """Send a typed control message (a cluster.messages record)."""
        self._send_bytes(self._encode(msg))

    def send_nowait(self, msg) -> bool:
        """Send `msg` if the socket takes it whole at once (a peer cut off by a partition must not
        hold the sender); False if it did not."""
        data = self._encode(msg)
        frame = _LEN.pack(len(data)) + data
        with self._send_lock:
            try:
                return self.sock.send(frame, socket.MSG_DONTWAIT) == len(frame)
            except OSError:
                return False

    def _encode(self, msg) -> bytes:
        from ..cluster.messages import encode

        if self.stamp is not None:
            msg.epoch = self.stamp()
        return encode(msg)

    def send_frame(self, msg: dict) -> None:
        """Send a raw map: the HELLO, whose fields the controller checks after the token."""
        self._send_bytes(msgpack.packb(msg, use_bin_type=True))

    def _send_bytes(self, data: bytes) -> None:
        if len(data) > MAX_FRAME:
            raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_FRAME}-byte frame limit")
        with self._send_lock:
            self.sock.sendall(_LEN.pack(len(data)) + data)

    def recv(self, timeout: float | None = None):
        """Next typed message; raises TimeoutError, ConnectionError (peer gone) or ProtocolError
        (MessageError: an unknown kind, or missing, unknown or mistyped fields)."""
        from ..cluster.messages import decode

        return decode(self.recv_frame(timeout))

    def recv_frame(self, timeout: float | None = None, max_frame: int = MAX_FRAME) -> dict:
        """Next frame as a raw map (at most `max_frame` bytes are read)."""
        self.sock.settimeout(timeout)
        try:
            (n,) = _LEN.unpack(self._exact(4))
            if n > max_frame:
                raise ProtocolError(f"{self.peer} sent a frame of {n} bytes (limit {max_frame})")
            data = self._exact(n)
        except socket.timeout:
            raise TimeoutError(f"no message from {self.peer} within {timeout}s") from None
        try:
            msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as e:  # noqa: BLE001 - any decode failure is the peer's protocol error
            raise ProtocolError(f"{self.peer} sent undecodable bytes: {e}") from None
        if not isinstance(msg, dict) or "t" not in msg:
            raise ProtocolError(f"{self.peer} sent a message without a type")
        return msg

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"{self.peer} closed the connection")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def connect(host: str, port: int, token: str, hello: dict, timeout: float = 30.0, wait: float = 0.0) -> Channel:
    """Connect to the controller and introduce ourselves with a HELLO of `hello`'s fields (rank or
    standby, pid, host: messages.Hello); raises if the token or the fields are refused. For up to
    `wait` seconds a controller not listening yet (refused, unreachable) is tried again."""
    deadline = time.monotonic() + wait
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            break
        except (ConnectionRefusedError, OSError) as e:
            if isinstance(e, socket.timeout) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    ch = Channel(sock, f"controller {host}:{port}")
    ch.send_frame({"t": "hello", "token": token, **hello})
    reply = ch.recv(timeout)
    if reply.t != "welcome":
        ch.close()
        raise ConnectionError(f"controller refused the connection: {getattr(reply, 'msg', reply)}")
    return ch
