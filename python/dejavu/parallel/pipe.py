"""Hidden states between consecutive pipeline stages over plain TCP, one connection per
(epoch, sender -> receiver).

Why not torch.distributed p2p: a process group is one failure domain (a dead rank leaves every
other rank's collectives hanging or aborting, and re-forming it needs every rank). Here a dead
peer only breaks its own connections: the next send or receive on them fails at once (EOF,
reset), the worker reports the step as failed, and the controller re-forms the pipes under a new
epoch, with the replacement worker, without touching the others' state.

Sends are asynchronous: `send` starts the device -> pinned host copy on the current stream and
queues it; a sending thread waits for the copy and writes the socket while the stage goes on with
its next microbatch (a blocking `sendall` would hold the stage until the next one, busy with the
microbatch before, reads). The queue is bounded (backpressure). A send that fails marks the pipes
broken: the next `send` raises, the receiver's `recv` fails on the closed connection, and
`on_broken` (the worker reports the step as failed) is called from the sending thread.

Connection: the sender connects to the receiver's listener and sends a HELLO frame (msgpack:
cluster token, epoch, sender rank); the receiver keeps only connections of its current epoch from
its expected upstream rank. Data frame: 16-byte header (step id u64, payload bytes u64, big
endian) then the tensor's raw bytes; the receiver checks both against what it expects.
"""
from __future__ import annotations

import os
import queue
import socket
import struct
import threading
from typing import Callable

import msgpack
import torch

from ..kvstream.auth import token_matches
from ..kvstream.net import LOOPBACK, Address, advertised, listen, recv_exact, serve_connections

_HDR = struct.Struct(">QQ")
_LEN = struct.Struct(">I")


class PipeBroken(ConnectionError):
    """The link to a neighbouring stage is gone (peer died, reset, timeout): the step fails."""


class StagePipes:
    MAX_QUEUED = 8  # sends not yet written to the socket before `send` waits

    def __init__(self, token: str, rank: int, host: str = LOOPBACK, timeout: float = 300.0,
                 on_broken: Callable[[int, str], None] | None = None, advertise: str | None = None):
        """Listens on `host` (the bind address); the previous stage dials `self.address`."""
        self.token, self.rank, self.timeout = token, rank, timeout
        self.on_broken = on_broken
        self.sync = os.environ.get("DEJAVU_PIPE_SYNC") == "1"  # wait for each send (a benchmark baseline)
        advertise = advertised(host, advertise)
        self._listener = listen(host)
        self.port = self._listener.getsockname()[1]
        self.address = Address(advertise, self.port)
        self._cond = threading.Condition()
        self._incoming: dict[tuple[int, int], socket.socket] = {}
        self.epoch = -1
        self.prev: int | None = None
        self.next: tuple[str, int, int] | None = None
        self._in: socket.socket | None = None
        self._out: socket.socket | None = None
        self.broken = False
        self._q: queue.Queue = queue.Queue(self.MAX_QUEUED)
        self._sender = threading.Thread(target=self._send_loop, daemon=True, name="pipe-send")
        self._sender.start()
        serve_connections(self._listener, self._hello, "pipe")

    # ------------------------------------------------------------------ set-up
    def configure(self, epoch: int, prev: int | None, nxt: tuple[str, int, int] | None) -> None:
        """A new epoch: drop every old connection; connect lazily on the first send / receive."""
        with self._cond:
            self._drop()
            self.epoch, self.prev, self.next = epoch, prev, tuple(nxt) if nxt else None
            self.broken = False
            for key in [k for k in self._incoming if k[0] < epoch]:
                _close(self._incoming.pop(key))

    def _drop(self) -> None:
        for s in (self._in, self._out):
            if s is not None:
                _close(s)
        self._in = self._out = None

    def fail(self) -> None:
        """Close both directions so the neighbours' current steps fail too (no one waits forever)."""
        with self._cond:
            self._drop()
            self.broken = True
            self._cond.notify_all()  # a receive waiting for its connection fails now

    def _hello(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(10.0)
            head = bytearray(4)
            recv_exact(sock, memoryview(head))
            (n,) = _LEN.unpack(head)
            if n > 4096:
                raise ConnectionError("oversized pipe hello")
            body = bytearray(n)
            recv_exact(sock, memoryview(body))
            msg = msgpack.unpackb(bytes(body), raw=False)
            if not isinstance(msg, dict) or not token_matches(msg.get("token"), self.token):
                raise ConnectionError("bad cluster token on a pipe connection")
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                key = (int(msg["epoch"]), int(msg["rank"]))
                if key[0] < self.epoch:
                    raise ConnectionError("stale epoch")
                old = self._incoming.pop(key, None)
                if old is not None:
                    _close(old)
                self._incoming[key] = sock
                self._cond.notify_all()
        except (OSError, ConnectionError, ValueError, KeyError, TypeError, msgpack.exceptions.ExtraData,
                msgpack.exceptions.UnpackException):
            _close(sock)

    # ------------------------------------------------------------------ data
    def send(self, step_id: int, t: torch.Tensor) -> None:
        """Queue `t` (this step's hidden states) for the next stage; returns before it is written."""
        if self.broken or self.next is None:
            raise PipeBroken(f"pipe to the next stage is down (epoch {self.epoch})")
        t = t.detach()
        done = None
        if t.is_cuda:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event(blocking=True)  # the sending thread sleeps on it (no polling)
            done.record()
            t = host
        self._q.put((self.epoch, step_id, t.contiguous(), done))
        if self.sync:
            self.flush()
            if self.broken:
                raise PipeBroken(f"sending step {step_id} to the next stage failed")

    def flush(self) -> None:
        """Wait until every queued send was written (or dropped by a failure)."""
        self._q.join()

    def _send_loop(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                epoch, step_id, t, done = item
                if done is not None:
                    done.synchronize()
                with self._cond:
                    if epoch != self.epoch or self.broken:
                        continue  # a send of an epoch already given up
                    out, nxt = self._out, self.next
                try:
                    if out is None:
                        out = socket.create_connection((nxt[0], nxt[1]), timeout=self.timeout)
                        out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        hello = msgpack.packb({"token": self.token, "epoch": epoch, "rank": self.rank})
                        out.sendall(_LEN.pack(len(hello)) + hello)
                        with self._cond:
                            if epoch != self.epoch:
                                _close(out)
                                continue
                            self._out = out
                    data = t.view(torch.uint8).numpy() if t.numel() else b""
                    out.sendall(_HDR.pack(step_id, t.numel() * t.element_size()))
                    out.sendall(memoryview(data))
                except OSError as e:
                    with self._cond:
                        stale = epoch != self.epoch
                    if not stale:
                        self.fail()
                        if self.on_broken is not None:
                            self.on_broken(step_id, f"sending step {step_id} to the next stage failed: {e}")
            finally:
                self._q.task_done()

    def recv(self, step_id: int, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous CPU tensor `out` with the previous stage's hidden states of `step_id`."""
        if self.broken or self.prev is None:
            raise PipeBroken(f"pipe from the previous stage is down (epoch {self.epoch})")
        try:
            if self._in is None:
                with self._cond:
                    key = (self.epoch, self.prev)
                    if not self._cond.wait_for(lambda: key in self._incoming or self.broken, self.timeout):
                        raise TimeoutError(f"stage rank {self.prev} did not connect within {self.timeout}s")
                    if self.broken:
                        raise ConnectionError("reset while waiting for the previous stage")
                    self._in = self._incoming.pop(key)
            self._in.settimeout(self.timeout)
            hdr = bytearray(_HDR.size)
            recv_exact(self._in, memoryview(hdr))
            sid, n = _HDR.unpack(hdr)
            view = out.view(torch.uint8).numpy()
            if sid != step_id or n != view.nbytes:
                raise ConnectionError(f"expected step {step_id} ({view.nbytes} bytes), got step {sid} ({n} bytes)")
            recv_exact(self._in, memoryview(view).cast("B"))
            return out
        except (OSError, TimeoutError) as e:
            self.fail()
            raise PipeBroken(f"receiving step {step_id} from the previous stage failed: {e}") from None

    def close(self) -> None:
        with self._cond:
            self.broken = True
        try:
            self._q.put_nowait(None)
        except queue.Full:
            pass  # the sender drops the rest (broken) and is a daemon thread
        with self._cond:
            self._drop()
            for s in self._incoming.values():
                _close(s)
            self._incoming.clear()
        _close(self._listener)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
