"""KV replicas in another worker's host memory (and optionally on its local disk).

Each replicating worker (the source) streams the K/V it writes to one holder; the holder keeps a
*mirror* of the source's paged cache in host memory: same shape, same block ids (the controller
hands out block ids for every stage at once), so a token written at (layer, block, slot) on the
source lands at the same place in the mirror. Token-level updates are small (one slot per
sequence per step); a whole-block update re-seeds a mirror (after its holder was replaced).

Integrity: every frame's payload carries a CRC-32C checked on arrival (a bad frame is refused, never
applied). At rest, the holder keeps one checksum per token slot (computed from the applied bytes);
whoever fetches a mirror recomputes them and never uses a slot that does not match. In memory that
is the CRC-32C of the slot's bytes over all layers. With a directory the mirror and its checksums
are files mapped shared (mode 600, directory 700): they survive the holder's process (the page
cache keeps them), a replacement holder reopens them (their shape is in a `.meta` file beside them),
and the holder of a clean shutdown removes them. Whoever can write files could fix up CRCs, so
there each slot's checksum is a MAC instead: keyed BLAKE2b-64 over (block, slot, bytes) with a key
derived from the cluster token and the source's name (`mac_key`); a rewritten file, a slot moved
elsewhere, or a torn write fails it.

Wire: 4-byte big-endian header length, a msgpack header {"t": op, ...}, then `n` raw payload
bytes. The first frame is a HELLO with the cluster token and no payload: nothing larger than
HELLO_MAX is read, and nothing allocated, before the token checks out. Nothing is unpickled.
"""
from __future__ import annotations

import atexit
import math
import os
import re
import socket
import struct
import threading
import weakref

import msgpack
import torch

from .auth import AUTH_DEADLINE, HELLO_MAX, derive_key, token_matches
from .net import LOOPBACK, Address, advertised, listen, recv_exact, serve_connections
from .mirror import Mirror, ReplicaError, _dtype

_LEN = struct.Struct(">I")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 30  # a frame to the holder (senders split theirs at 64 MiB)
MAX_REPLY = 16 << 30   # a holder's answer (a whole stage's blocks when restoring)
# Checksumming a restore's blocks is on the replacement's critical path: up to 8 threads (C++, no GIL)
_CRC_THREADS = min(8, os.cpu_count() or 1)
_SRC = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # a worker's name: also part of a file name


def _crc_items(x: torch.Tensor, item_dims: tuple[int, ...], piece_dims: tuple[int, ...]) -> torch.Tensor:
    """One CRC-32C per index over `item_dims` of x, over x's pieces (the trailing dims after
    `piece_dims`, which must be contiguous) in the order of `piece_dims`, read in place."""
    from .. import _C

    tail = x.dim() - (len(item_dims) + len(piece_dims))
    want = 1
    for d in range(x.dim() - 1, x.dim() - tail - 1, -1):  # the pieces themselves must be dense
        if x.shape[d] != 1 and x.stride(d) != want:
            x = x.contiguous()
            break
        want *= x.shape[d]
    if x.device.type != "cpu":
        raise ValueError("checksums are computed on host tensors")
    es = x.element_size()

    def offsets(dims):
        off = torch.zeros((), dtype=torch.int64)
        for d in dims:
            off = off.unsqueeze(-1) + torch.arange(x.shape[d], dtype=torch.int64) * (x.stride(d) * es)
        return off.reshape(-1).contiguous()
    items, pieces = offsets(item_dims), offsets(piece_dims)
    piece_bytes = es * math.prod(x.shape[x.dim() - tail:])
    out = torch.empty(items.numel(), dtype=torch.int64)
    if items.numel():
        _C.crc32c_items(x.data_ptr(), items.data_ptr(), items.numel(), pieces.data_ptr(), pieces.numel(),
                        piece_bytes, out.data_ptr(), _CRC_THREADS)
    return out


def slot_checksums(x: torch.Tensor) -> torch.Tensor:
    """x: [layers, n, 2, heads, head_dim] (one entry per token slot, K then V) -> int64 [n]: the
    CRC-32C (DéjàVuLib's, hardware-accelerated, GIL released) of each slot's bytes, layer-major
    (layer 0 K, layer 0 V, layer 1 K, ...), computed in place."""
    return _crc_items(x, item_dims=(1,), piece_dims=(0, 2))


def block_checksums(x: torch.Tensor, blocks=None, key: bytes | None = None) -> torch.Tensor:
    """x: [layers, nb, 2, block_size, heads, head_dim] whole blocks -> int64 [nb, block_size]: CRC-32Cs,
    or with `key` the slots' MACs (a disk mirror's), x's blocks being the cache's `blocks`."""
    nb, bs = x.shape[1], x.shape[3]
    if key is None:
        return _crc_items(x, item_dims=(1, 3), piece_dims=(0, 2)).view(nb, bs)
    from .. import _C

    x = x.contiguous()
    es = x.element_size()
    items = (torch.arange(nb).view(-1, 1) * (x.stride(1) * es) + torch.arange(bs) * (x.stride(3) * es)).reshape(-1)
    pieces = (torch.arange(x.shape[0]).view(-1, 1) * (x.stride(0) * es) + torch.arange(2) * (x.stride(2) * es))
    pieces = pieces.reshape(-1).contiguous()
    ids = torch.stack([torch.as_tensor(list(blocks), dtype=torch.int64).repeat_interleave(bs),
                       torch.arange(bs, dtype=torch.int64).repeat(nb)], 1).contiguous()
    out = torch.empty(nb * bs, dtype=torch.int64)
    if nb:
        _C.mac_items(key, x.data_ptr(), items.contiguous().data_ptr(), ids.data_ptr(), nb * bs, pieces.data_ptr(),
                     pieces.numel(), es * x.shape[4] * x.shape[5], out.data_ptr())
    return out.view(nb, bs)


def mac_key(token: str, src: str) -> bytes:
    """The key of the MACs on `src`'s mirror files."""
    return derive_key(token, "replica-mac/" + src)


# ---------------------------------------------------------------------- framing
def _send(sock: socket.socket, hdr: dict, payload: torch.Tensor | None = None) -> None:
    data = payload.contiguous().view(torch.uint8).numpy() if payload is not None else None
    hdr = {**hdr, "n": 0 if data is None else data.nbytes}
    if data is not None:
        hdr["crc"] = _crc(data)
    h = msgpack.packb(hdr, use_bin_type=True)
    sock.sendall(_LEN.pack(len(h)) + h)
    if data is not None and data.nbytes:
        sock.sendall(memoryview(data))


def _crc(data) -> int:
    from .. import _C

    return _C.crc32c(data.ctypes.data, data.nbytes) if data.nbytes else 0


def _recv(sock: socket.socket, max_header: int = MAX_HEADER,
          max_payload: int = MAX_REPLY) -> tuple[dict, torch.Tensor | None]:
    head = bytearray(4)
    recv_exact(sock, memoryview(head))
    (n,) = _LEN.unpack(head)
    if n > max_header:
        raise ReplicaError(f"replica header of {n} bytes exceeds {max_header}")
    body = bytearray(n)
    recv_exact(sock, memoryview(body))
    return _recv_rest(sock, bytes(body), max_payload)


def _recv_rest(sock: socket.socket, body: bytes, max_payload: int = MAX_PAYLOAD) -> tuple[dict, torch.Tensor | None]:
    """A frame whose header `body` was read: decode it and read its payload (at most max_payload bytes)."""
    try:
        hdr = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as e:  # noqa: BLE001 - the peer's protocol error
        raise ReplicaError(f"undecodable replica header: {e}") from None
    if not isinstance(hdr, dict) or "t" not in hdr:
        raise ReplicaError("replica header without a type")
    size = hdr.get("n", 0)
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= max_payload:
        raise ReplicaError(f"replica payload of {size} bytes is out of bounds")
    payload = None
    if size:
        payload = torch.empty(size, dtype=torch.uint8)
        recv_exact(sock, memoryview(payload.numpy()), "replica peer")
        if _crc(payload.numpy()) != hdr.get("crc"):
            raise ValueError("replica payload failed its CRC-32C")
    return hdr, payload


class ReplicaServer:
    """The holder side: mirrors of other workers' caches, served over TCP. Binds `host`
    (127.0.0.1 unless told); sources dial `self.address` (`advertise`, else `host`)."""

    def __init__(self, token: str, host: str = LOOPBACK, directory: str | None = None, prefix: str = "",
                 advertise: str | None = None):
        advertise = advertised(host, advertise)
        self.token, self.directory, self.prefix = token, directory, prefix
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        self.mirrors: dict[str, Mirror] = {}
        self._retired: list[Mirror] = []  # replaced mirrors stay mapped: a connection may still be writing one
        self._lock = threading.Lock()
        self._listener = listen(host)
        self.port = self._listener.getsockname()[1]
        self.address = Address(advertise, self.port)
        self._bytes_in = self._refused = 0
        # Data frames (put_slots, put_blocks) are applied by C++ on each connection's thread without
        # the interpreter lock; every other frame comes back here.
        from .. import _C

        self._fast = _C.ReplicaFastPath(MAX_PAYLOAD)
        self._conns: dict[socket.socket, threading.Thread] = {}
        serve_connections(self._listener, self._serve, "replica")
        # Connection threads wait inside C++; they must be gone before the interpreter finalizes
        # (a daemon thread torn down in a C++ call aborts the process).
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().stop())

    @property
    def bytes_in(self) -> int:
        return self._bytes_in + self._fast.bytes_in()

    @property
    def refused(self) -> int:
        """Frames refused for a bad checksum (never applied)."""
        return self._refused + self._fast.refused()

    def path(self, src: str) -> str | None:
        return os.path.join(self.directory, f"{self.prefix}{src}") if self.directory else None

    def _serve(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns[sock] = threading.current_thread()
        try:
            sock.settimeout(AUTH_DEADLINE)
            hdr, _ = _recv(sock, HELLO_MAX, 0)  # nothing allocated before the token checks out
            if hdr.get("t") != "hello" or not token_matches(hdr.get("token"), self.token):
                _send(sock, {"t": "err", "msg": "bad cluster token"})
                return
            _send(sock, {"t": "ok"})
            sock.settimeout(None)
            while True:
                body = self._fast.serve(sock.fileno())
                if not body:
                    return  # the peer closed
                try:
                    hdr, payload = _recv_rest(sock, body)
                except ValueError as e:  # bad CRC: refused, never applied; the stream stays in sync
                    self._refused += 1
                    _send(sock, {"t": "err", "msg": str(e)})
                    continue
                try:
                    reply, out = self._handle(hdr, payload)
                except (ReplicaError, RuntimeError, KeyError, TypeError, ValueError) as e:
                    reply, out = {"t": "err", "msg": f"{type(e).__name__}: {e}"}, None
                _send(sock, reply, out)
        except (OSError, ConnectionError, ReplicaError, RuntimeError):  # RuntimeError: the C++ loop's broken stream
            pass
        finally:
            with self._lock:
                self._conns.pop(sock, None)
            try:
                sock.close()
            except OSError:
                pass

    def _handle(self, hdr: dict, payload):
        t, src = hdr["t"], hdr.get("src", "")
        if not isinstance(src, str) or not _SRC.fullmatch(src):
            raise ReplicaError(f"bad replica source name {src!r}")
        if t == "open":
            with self._lock:
                m = self.mirrors.get(src)
                shape, dtype = tuple(hdr["shape"]), _dtype(hdr["dtype"])
                if m is None or m.shape != shape or m.dtype != dtype:
                    nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
                    if nbytes > _host_memory():
                        raise ReplicaError(f"a mirror of {nbytes} bytes does not fit this host's memory")
                    if m is not None:
                        self._retired.append(m)
                    m = self.mirrors[src] = Mirror(shape, dtype, self.path(src), self._key(src))
                    self._fast.add(src, m.native)
            return {"t": "ok"}, None
        m = self.mirrors.get(src) or self._reopen(src)
        if m is None:
            raise ReplicaError(f"no replica of {src} here")
        if t == "put_slots":
            m.put_slots(hdr["blocks"], hdr["slots"], payload)
        elif t == "put_blocks":
            m.put_blocks(hdr["blocks"], payload)
        elif t == "get_blocks" and "shm" in hdr:  # a replacement on this host: into its segment
            from .replica_local import fill

            return fill(m, hdr, self.token)
        elif t == "get_blocks":
            data, chk = m.get_blocks(hdr["blocks"])
            return {"t": "data", "chk": chk.numpy().tobytes()}, data.view(torch.uint8).reshape(-1)
        else:
            raise ReplicaError(f"unknown replica operation {t!r}")
        self._bytes_in += 0 if payload is None else payload.numel()
        return {"t": "ok"}, None

    def _key(self, src: str) -> bytes | None:
        return mac_key(self.token, src) if self.directory else None

    def _reopen(self, src: str) -> Mirror | None:
        """A mirror that a holder before us left in the directory (it was replaced), or None."""
        path = self.path(src)
        if not path or not os.path.exists(path + ".meta"):
            return None
        with self._lock:
            if src not in self.mirrors:
                m = self.mirrors[src] = Mirror.reopen(path, self._key(src))
                self._fast.add(src, m.native)
            return self.mirrors[src]

    def stop(self, remove_files: bool = False) -> None:
        """Stop serving; `remove_files` (a clean shutdown of the deployment): delete the mirrors' files."""
        if remove_files:
            with self._lock:
                for m in list(self.mirrors.values()) + self._retired:
                    m.remove_files()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (close alone does not)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            conns = list(self._conns.items())
        for sock, _ in conns:  # wakes each connection's thread out of its blocking read
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, t in conns:
            if t is not threading.current_thread():
                t.join(5.0)


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1 << 40


class ReplicaClient:
    """The source side (and the recovering side): one connection to one holder."""

    def __init__(self, host: str, port: int, token: str, timeout: float = 30.0):
        self.peer = f"{host}:{port}"
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self._lock = threading.Lock()
        reply, _ = self._call({"t": "hello", "token": token})

    def _call(self, hdr: dict, payload: torch.Tensor | None = None):
        with self._lock:
            _send(self.sock, hdr, payload)
            reply, data = _recv(self.sock)
        if reply.get("t") == "err":
            raise ReplicaError(f"replica holder {self.peer}: {reply.get('msg')}")
        return reply, data

    def open(self, src: str, shape, dtype: torch.dtype) -> None:
        self._call({"t": "open", "src": src, "shape": list(shape), "dtype": str(dtype).replace("torch.", "")})

    def put_slots(self, src: str, blocks, slots, payload: torch.Tensor) -> None:
        self._call({"t": "put_slots", "src": src, "blocks": list(blocks), "slots": list(slots)}, payload)

    def put_blocks(self, src: str, blocks, payload: torch.Tensor) -> None:
        self._call({"t": "put_blocks", "src": src, "blocks": list(blocks)}, payload)

    def get_blocks(self, src: str, blocks, segment=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' bytes and slot checksums; with `segment` (replica_local.RestoreSegment, the
        holder on this host) the holder writes the bytes into it and only the checksums come here."""
        hdr = {"t": "get_blocks", "src": src, "blocks": list(blocks)}
        if segment is not None:
            hdr["shm"] = segment.name
        reply, data = self._call(hdr)
        chk = torch.frombuffer(bytearray(reply["chk"]), dtype=torch.int64)
        if segment is not None:
            data = segment.data
        return (data if data is not None else torch.empty(0, dtype=torch.uint8)), chk

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
